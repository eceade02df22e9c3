//! Mirror task ownership against librdkafka's mock cluster, with a fake runner that records
//! every start and stop and checks that no mirror partition ever has two running tasks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{init_tracing, wait_for};
use dtfed::kafka::MockKafka;
use dtfed::mirror::tasks::{MirrorTaskRunner, MirrorTasks, MirrorTopic};
use tokio_util::sync::CancellationToken;

type Key = (String, i32);

/// What every fake runner of a test saw, shared between the daemons.
#[derive(Default)]
struct Registry {
    /// Running tasks: (origin, partition) → owner.
    running: Mutex<BTreeMap<Key, String>>,
    /// Starts, in order: (owner, origin, origin topic, partition).
    starts: Mutex<Vec<(String, String, String, i32)>>,
    stops: AtomicUsize,
    /// Every time a task started while another ran for the same partition.
    violations: Mutex<Vec<String>>,
    /// How long a stopped task takes to end (a slow stop: a new owner starting before the
    /// old task ended would be caught).
    stop_delay_ms: AtomicU64,
}

impl Registry {
    fn new(stop_delay: Duration) -> Arc<Registry> {
        let reg = Registry::default();
        reg.set_stop_delay(stop_delay);
        Arc::new(reg)
    }

    fn set_stop_delay(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).expect("ms");
        self.stop_delay_ms.store(ms, Ordering::SeqCst);
    }

    fn running(&self) -> BTreeMap<Key, String> {
        self.running.lock().expect("lock").clone()
    }

    fn running_of(&self, owner: &str) -> BTreeSet<Key> {
        self.running()
            .into_iter()
            .filter(|(_, o)| o == owner)
            .map(|(k, _)| k)
            .collect()
    }

    fn starts(&self) -> Vec<(String, String, String, i32)> {
        self.starts.lock().expect("lock").clone()
    }

    fn assert_no_overlap(&self) {
        let v = self.violations.lock().expect("lock");
        assert!(v.is_empty(), "two tasks ran for one partition: {v:?}");
    }
}

/// Runs until stopped, then takes the registry's stop delay to end. With `return_early`,
/// its first run of each partition returns at once, without being stopped.
struct FakeRunner {
    owner: String,
    reg: Arc<Registry>,
    return_early: bool,
}

#[async_trait]
impl MirrorTaskRunner for FakeRunner {
    async fn run(
        &self,
        origin: String,
        origin_topic: String,
        partition: i32,
        stop: CancellationToken,
    ) {
        let key = (origin.clone(), partition);
        let first = {
            let mut running = self.reg.running.lock().expect("lock");
            if let Some(other) = running.insert(key.clone(), self.owner.clone()) {
                self.reg.violations.lock().expect("lock").push(format!(
                    "{origin}/{partition}: started by {} while {other} ran it",
                    self.owner
                ));
            }
            let mut starts = self.reg.starts.lock().expect("lock");
            let first = !starts
                .iter()
                .any(|(o, or, _, p)| *o == self.owner && *or == origin && *p == partition);
            starts.push((self.owner.clone(), origin, origin_topic, partition));
            first
        };
        if !(self.return_early && first) {
            stop.cancelled().await;
            let ms = self.reg.stop_delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut running = self.reg.running.lock().expect("lock");
        if running.get(&key) == Some(&self.owner) {
            running.remove(&key);
        }
        self.reg.stops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Two origins: tokyo (3 partitions) and paris (2).
fn mirror_topics(mock: &MockKafka) -> Vec<MirrorTopic> {
    mock.create_topic("dtfed.mirror.tokyo", 3).expect("topic");
    mock.create_topic("dtfed.mirror.paris", 2).expect("topic");
    vec![
        MirrorTopic {
            origin: "tokyo".into(),
            mirror_topic: "dtfed.mirror.tokyo".into(),
            origin_topic: "tokyo.local".into(),
        },
        MirrorTopic {
            origin: "paris".into(),
            mirror_topic: "dtfed.mirror.paris".into(),
            origin_topic: "paris.local".into(),
        },
    ]
}

fn all_keys() -> BTreeSet<Key> {
    let mut s = BTreeSet::new();
    for p in 0..3 {
        s.insert(("tokyo".to_owned(), p));
    }
    for p in 0..2 {
        s.insert(("paris".to_owned(), p));
    }
    s
}

fn start(
    mock: &MockKafka,
    topics: &[MirrorTopic],
    group: &str,
    runner: FakeRunner,
    stop: &CancellationToken,
) -> MirrorTasks {
    let node = runner.owner.clone();
    MirrorTasks::start(
        &common::mock_kafka(mock, "dtfed.local", 1),
        "seoul",
        &node,
        group.into(),
        topics.to_vec(),
        Arc::new(runner),
        stop.clone(),
    )
    .expect("start")
}

fn runner(owner: &str, reg: &Arc<Registry>) -> FakeRunner {
    FakeRunner {
        owner: owner.into(),
        reg: Arc::clone(reg),
        return_early: false,
    }
}

fn owned(t: &MirrorTasks) -> BTreeSet<Key> {
    t.status().owned.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_runs_a_task_per_partition_and_shutdown_stops_them_all() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    let topics = mirror_topics(&mock);
    let reg = Registry::new(Duration::from_millis(200));
    let stop = CancellationToken::new();
    let a = start(&mock, &topics, "mt-one", runner("a", &reg), &stop);
    wait_for("a owns every partition", Duration::from_secs(30), || {
        let s = a.status();
        s.joined && owned(&a) == all_keys() && reg.running_of("a") == all_keys()
    })
    .await;
    // One task per partition, told the right origin and origin topic.
    let mut starts = reg.starts();
    starts.sort();
    let want: Vec<(String, String, String, i32)> = all_keys()
        .into_iter()
        .map(|(origin, p)| {
            let topic = format!("{origin}.local");
            ("a".to_owned(), origin, topic, p)
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(starts, want);
    // Steady: nothing restarts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reg.starts().len(), 5);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), a.join())
        .await
        .expect("a stops");
    assert!(
        reg.running().is_empty(),
        "still running: {:?}",
        reg.running()
    );
    assert_eq!(reg.stops.load(Ordering::SeqCst), 5);
    reg.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_owner_splits_the_tasks_and_takes_them_all_over_without_overlap() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    let topics = mirror_topics(&mock);
    // Slow stops, longer than the mock cluster takes between the revocation and the
    // follow-up rebalance that hands the partitions on (~5 s): if the new owner started a
    // task before the old one's ended, the registry would see both running.
    let reg = Registry::new(Duration::from_secs(7));
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let a = start(&mock, &topics, "mt-two", runner("a", &reg), &stop_a);
    wait_for("a owns every partition", Duration::from_secs(30), || {
        owned(&a) == all_keys() && reg.running_of("a") == all_keys()
    })
    .await;

    let b = start(&mock, &topics, "mt-two", runner("b", &reg), &stop_b);
    wait_for("a split between a and b", Duration::from_secs(40), || {
        let (oa, ob) = (owned(&a), owned(&b));
        let running = reg.running();
        b.status().joined
            && !oa.is_empty()
            && !ob.is_empty()
            && oa.is_disjoint(&ob)
            && oa.union(&ob).cloned().collect::<BTreeSet<_>>() == all_keys()
            && reg.running_of("a") == oa
            && reg.running_of("b") == ob
            && running.len() == 5
    })
    .await;
    reg.assert_no_overlap();
    let (oa, ob) = (owned(&a), owned(&b));
    eprintln!("split: a {oa:?}, b {ob:?}");
    // b started exactly the tasks it owns; a's moved ones were stopped first.
    let b_starts: BTreeSet<Key> = reg
        .starts()
        .into_iter()
        .filter(|(o, ..)| o == "b")
        .map(|(_, origin, _, p)| (origin, p))
        .collect();
    assert_eq!(b_starts, ob);

    // a shuts down: b takes everything over, still one task per partition at a time.
    reg.set_stop_delay(Duration::from_millis(500));
    let t0 = Instant::now();
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(15), a.join())
        .await
        .expect("a stops");
    assert!(
        reg.running_of("a").is_empty(),
        "a's tasks still run after its join"
    );
    wait_for("b owns every partition", Duration::from_secs(30), || {
        owned(&b) == all_keys() && reg.running_of("b") == all_keys()
    })
    .await;
    eprintln!("take-over took {:?}", t0.elapsed());
    reg.assert_no_overlap();

    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(15), b.join())
        .await
        .expect("b stops");
    assert!(
        reg.running().is_empty(),
        "still running: {:?}",
        reg.running()
    );
    let starts = reg.starts().len();
    assert_eq!(reg.stops.load(Ordering::SeqCst), starts);
    reg.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_on_its_own_is_restarted() {
    init_tracing();
    let mock = MockKafka::start(1).expect("mock");
    let topics = mirror_topics(&mock);
    let reg = Registry::new(Duration::ZERO);
    let stop = CancellationToken::new();
    let mut r = runner("a", &reg);
    r.return_early = true;
    let a = start(&mock, &topics, "mt-restart", r, &stop);
    // Every first run returned at once; each is started again (after ~1 s) and then runs.
    wait_for(
        "every task restarted and running",
        Duration::from_secs(30),
        || reg.running_of("a") == all_keys() && reg.starts().len() == 10,
    )
    .await;
    assert_eq!(owned(&a), all_keys());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), a.join())
        .await
        .expect("a stops");
    assert!(reg.running().is_empty());
    reg.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_bad_arguments() {
    let mock = MockKafka::start(1).expect("mock");
    let reg = Registry::new(Duration::ZERO);
    let stop = CancellationToken::new();
    let none = MirrorTasks::start(
        &common::mock_kafka(&mock, "dtfed.local", 1),
        "seoul",
        "a",
        "g".into(),
        Vec::new(),
        Arc::new(runner("a", &reg)),
        stop.clone(),
    );
    assert!(none.is_err());
    let t = MirrorTopic {
        origin: "tokyo".into(),
        mirror_topic: "dtfed.mirror.tokyo".into(),
        origin_topic: "dtfed.local".into(),
    };
    let twice = MirrorTasks::start(
        &common::mock_kafka(&mock, "dtfed.local", 1),
        "seoul",
        "a",
        "g".into(),
        vec![t.clone(), t],
        Arc::new(runner("a", &reg)),
        stop,
    );
    assert!(twice.is_err());
}
