// The demo chat page in a real browser: Debian's chromium, headless, driven by
// puppeteer-core. One page per region (each served by that region's daemon, speaking
// through @dtfed/client); both join one room, each sends, and each must see the other's
// message marked with the other region as its origin, and its own with its own region.
// Env: PAGE_A, PAGE_B (http://.../), REGION_A, REGION_B, ROOM, CHROMIUM (the executable),
// CONTROL_DIR (where the browser's PID goes first, so the test can kill it whatever
// happens). Prints "ok" last on success.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import puppeteer from "puppeteer-core";
import { log } from "./lib.mjs";

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
  if (problems.length) throw new Error(problems.join("\n"));
  log(`ok: each page shows both messages once, the other's with origin ${REGION_A}/${REGION_B}`);
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
