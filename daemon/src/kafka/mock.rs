//! librdkafka's mock cluster for `dtfed demo` and unit tests: a Kafka in-process, kept
//! alive on a thread of its own, with the topic creation the mock does not implement.

use std::collections::HashMap;
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::JoinHandle;

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};

use crate::kafka::KafkaSetupError;

/// The mock clusters alive in this process, by bootstrap address, so that
/// [`ensure_topic`] can create topics on them (the mock does not implement CreateTopics).
static MOCKS: OnceLock<Mutex<HashMap<String, mpsc::Sender<MockCmd>>>> = OnceLock::new();

fn mocks() -> std::sync::MutexGuard<'static, HashMap<String, mpsc::Sender<MockCmd>>> {
    let m = MOCKS.get_or_init(|| Mutex::new(HashMap::new()));
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Creates `topic` on the in-process mock cluster at `brokers`, if that is one. `None`: not
/// a mock of this process.
pub(super) fn create_on_mock(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> Option<Result<(), String>> {
    let tx = mocks().get(brokers.trim()).cloned()?;
    let (reply, result) = mpsc::channel();
    if tx
        .send(MockCmd::CreateTopic {
            topic: topic.to_owned(),
            partitions,
            reply,
        })
        .is_err()
    {
        return Some(Err("mock cluster stopped".into()));
    }
    Some(
        result
            .recv()
            .map_err(|_| "mock cluster stopped".to_owned())
            .and_then(|r| r),
    )
}

enum MockCmd {
    CreateTopic {
        topic: String,
        partitions: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
    BrokerDown {
        broker: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
    BrokerUp {
        broker: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
    RequestErrors {
        api: RDKafkaApiKey,
        errors: Vec<RDKafkaRespErr>,
        reply: mpsc::Sender<Result<(), String>>,
    },
}

/// librdkafka's in-process mock cluster, for `dtfed demo` and tests.
///
/// librdkafka's handle is not `Send`, so the cluster lives on a thread of its own for as
/// long as this value does; the methods below talk to that thread. Dropping a `MockKafka`
/// destroys the cluster (clients still pointed at it then see all brokers down).
///
/// The mock implements produce, fetch, consumer groups and idempotent producers, but not
/// CreateTopics: create topics with [`MockKafka::create_topic`] (or let a metadata request
/// auto-create them with 4 partitions).
pub struct MockKafka {
    bootstrap: String,
    brokers: i32,
    tx: Option<mpsc::Sender<MockCmd>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap", &self.bootstrap)
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl MockKafka {
    pub fn start(brokers: i32) -> Result<MockKafka, KafkaSetupError> {
        let unreachable = |detail: String| KafkaSetupError::Unreachable {
            brokers: "mock".into(),
            detail,
        };
        if brokers < 1 {
            return Err(unreachable(format!(
                "a mock cluster needs at least 1 broker, not {brokers}"
            )));
        }
        let (tx, rx) = mpsc::channel::<MockCmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let thread = std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serve commands until the MockKafka is dropped (the channel closes).
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        MockCmd::CreateTopic {
                            topic,
                            partitions,
                            reply,
                        } => {
                            let rf = brokers.min(3);
                            let _ =
                                reply.send(match cluster.create_topic(&topic, partitions, rf) {
                                    Ok(())
                                    | Err(KafkaError::MockCluster(
                                        RDKafkaErrorCode::TopicAlreadyExists,
                                    )) => Ok(()),
                                    Err(e) => Err(e.to_string()),
                                });
                        }
                        MockCmd::BrokerDown { broker, reply } => {
                            let _ =
                                reply.send(cluster.broker_down(broker).map_err(|e| e.to_string()));
                        }
                        MockCmd::BrokerUp { broker, reply } => {
                            let _ =
                                reply.send(cluster.broker_up(broker).map_err(|e| e.to_string()));
                        }
                        MockCmd::RequestErrors { api, errors, reply } => {
                            if errors.is_empty() {
                                cluster.clear_request_errors(api);
                            } else {
                                cluster.request_errors(api, &errors);
                            }
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
                drop(cluster);
            })
            .map_err(|e| unreachable(format!("cannot start the mock cluster thread: {e}")))?;
        let bootstrap = match ready_rx.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(unreachable(format!("mock cluster: {e}"))),
            Err(_) => return Err(unreachable("mock cluster thread died".into())),
        };
        mocks().insert(bootstrap.clone(), tx.clone());
        tracing::info!(%bootstrap, brokers, "started librdkafka mock cluster");
        Ok(MockKafka {
            bootstrap,
            brokers,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Number of brokers; their ids are `1..=brokers`.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    fn call(
        &self,
        what: &str,
        make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> MockCmd,
    ) -> Result<(), KafkaSetupError> {
        let fail = |detail: String| KafkaSetupError::Unreachable {
            brokers: self.bootstrap.clone(),
            detail: format!("mock cluster {what}: {detail}"),
        };
        let (reply, result) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| fail("stopped".into()))?
            .send(make(reply))
            .map_err(|_| fail("thread gone".into()))?;
        result
            .recv()
            .map_err(|_| fail("thread gone".into()))?
            .map_err(fail)
    }

    /// Creates `topic` with `partitions` partitions (replication min(brokers, 3)); a topic
    /// that exists already is left as it is.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaSetupError> {
        self.call("create_topic", |reply| MockCmd::CreateTopic {
            topic: topic.to_owned(),
            partitions,
            reply,
        })
        .map_err(|e| KafkaSetupError::Topic {
            topic: topic.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Disconnects broker `broker` (`-1`: all) and refuses new connections to it.
    pub fn broker_down(&self, broker: i32) -> Result<(), KafkaSetupError> {
        self.call("broker_down", |reply| MockCmd::BrokerDown { broker, reply })
    }

    /// Lets broker `broker` (`-1`: all) accept connections again.
    pub fn broker_up(&self, broker: i32) -> Result<(), KafkaSetupError> {
        self.call("broker_up", |reply| MockCmd::BrokerUp { broker, reply })
    }
}

impl MockKafka {
    /// Makes the next requests of kind `api` fail with `errors`, one error per request, in
    /// order (an empty list clears them).
    pub fn request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), KafkaSetupError> {
        let errors = errors.to_vec();
        self.call("request_errors", |reply| MockCmd::RequestErrors {
            api,
            errors,
            reply,
        })
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop, which destroys the cluster.
        mocks().remove(&self.bootstrap);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
