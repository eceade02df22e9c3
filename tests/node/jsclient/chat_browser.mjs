// The demo chat page in a real browser: Debian's chromium, headless, driven by
// puppeteer-core. One page per region (each served by that region's daemon, speaking
// through @dtfed/client); both join one room, each sends, and each must see the other's
// message marked with the other region as its origin, and its own with its own region.
// Then B's page must show A's link as up, as down ("link down since …, messages may arrive
// late") once the Rust side cut the link B pulls A over (control files `cut` / `was-cut`),
// and as up again after the heal (`heal` / `was-healed`).
// Env: PAGE_A, PAGE_B (http://.../), REGION_A, REGION_B, ROOM, CHROMIUM (the executable),
// CONTROL_DIR (where the browser's PID goes first, so the test can kill it whatever
// happens). Prints "ok" last on success.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import puppeteer from "puppeteer-core";
import { log, signal, waitSignal } from "./lib.mjs";

const { PAGE_A, PAGE_B, REGION_A, REGION_B, ROOM, CHROMIUM, CONTROL_DIR } = process.env;
const T = 30_000;

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
writeFileSync(join(CONTROL_DIR, "browser.pid"), `${browser.process().pid}\n`);
log(`chromium pid ${browser.process().pid} (${await browser.version()})`);

/** Opens `url`, joins ROOM as `name`, and waits until the page says it is live. */
async function open(url, name, problems) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => problems.push(`${name}: page error ${e.message}`));
  page.on("console", (m) => {
    // The browser asks for /favicon.ico by itself; the page has none.
    if (m.type() === "error" && !m.location()?.url?.endsWith("/favicon.ico")) {
      problems.push(`${name}: console error ${m.text()} (${m.location()?.url})`);
    }
  });
  pages.push([name, page]);
  await page.goto(url, { waitUntil: "load" });
  await page.$eval("#name", (e, v) => { e.value = v; }, name);
  await page.$eval("#room", (e, v) => { e.value = v; }, ROOM);
  await page.click("#joinBtn");
  await page.waitForSelector('#state[data-state="live"]', { timeout: T });
  log(`${name} is live in ${ROOM} at ${url}`);
  return page;
}

/** Types `text` and presses Enter, as a player would. */
async function say(page, text) {
  await page.type("#text", text);
  await page.keyboard.press("Enter");
}

/** Waits for a message line from `from` stored in `origin` whose text is `text`. */
async function seen(page, from, origin, text) {
  const sel = `li.msg[data-from="${from}"][data-origin="${origin}"]`;
  await page.waitForFunction(
    (s, t) => [...document.querySelectorAll(s)].some((li) => li.querySelector(".text")?.textContent === t),
    { timeout: T, polling: 100 },
    sel,
    text,
  );
}

const problems = [];
const pages = [];
try {
  const alice = await open(PAGE_A, "alice", problems);
  const bob = await open(PAGE_B, "bob", problems);
  await say(alice, "hail from the first region");
  await say(bob, "and well met from the second");
  await seen(bob, "alice", REGION_A, "hail from the first region");
  await seen(alice, "bob", REGION_B, "and well met from the second");
  await seen(alice, "alice", REGION_A, "hail from the first region");
  await seen(bob, "bob", REGION_B, "and well met from the second");
  const badge = await alice.$eval(`li.msg[data-from="bob"] .badge`, (e) => e.textContent);
  if (!badge.startsWith(`${REGION_B} #`)) throw new Error(`alice's page shows bob's origin as ${badge}`);
  for (const page of [alice, bob]) {
    // Both messages, once each, none left pending (an own line merges its ack and echo).
    const once = () => {
      const ids = [...document.querySelectorAll("li.msg")].map((l) => l.dataset.id);
      return ids.length === 2 && ids.every(Boolean) && ids[0] !== ids[1];
    };
    await page.waitForFunction(once, { timeout: 5_000, polling: 100 }).catch(async () => {
      const ids = await page.$$eval("li.msg", (ls) => ls.map((l) => l.dataset.id ?? "pending"));
      throw new Error(`page shows ${JSON.stringify(ids)}, not the two messages once each`);
    });
  }
  // B's page: A's replication watermark, live, then down while the link is cut, then live.
  const line = (live) => `#origins [data-origin="${REGION_A}"][data-live="${live}"]`;
  await bob.waitForSelector(line(true), { timeout: T });
  const upText = await bob.$eval(line(true), (e) => e.textContent);
  if (/down|late/.test(upText)) throw new Error(`a live link reads ${JSON.stringify(upText)}`);
  if (await alice.$(`#origins [data-origin="${REGION_B}"][data-live="false"]`)) throw new Error("alice's page says bob's region is down");
  signal("cut");
  await waitSignal("was-cut");
  const cutAt = Date.now();
  await bob.waitForSelector(line(false), { timeout: T });
  const downText = await bob.$eval(line(false), (e) => e.textContent);
  log(`${Date.now() - cutAt} ms after the cut bob's page says: ${downText}`);
  const want = new RegExp(`^${REGION_A}: link down since \\d{1,2}:\\d{2}.*, messages may arrive late$`);
  if (!want.test(downText)) throw new Error(`bob's page says ${JSON.stringify(downText)}`);
  signal("heal");
  await waitSignal("was-healed");
  await bob.waitForSelector(line(true), { timeout: 60_000 });
  log(`bob's page says ${REGION_A} is live again: ${await bob.$eval(line(true), (e) => e.textContent)}`);
  if (problems.length) throw new Error(problems.join("\n"));
  log(`ok: each page shows both messages once, the other's with origin ${REGION_A}/${REGION_B}; ${REGION_A}'s link shown down while cut`);
} catch (e) {
  log(`FAILED: ${e.stack}\n${problems.join("\n")}`);
  for (const [name, page] of pages) {
    const text = await page.$eval("body", (b) => b.innerText).catch((err) => `(unreadable: ${err.message})`);
    log(`${name}'s page:\n${text}`);
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
