// Drives the reference server's web UI in headless Chromium (Debian's, through playwright-core):
// the agent list, an agent clicked while a list refresh is in flight, an agent page, a push to
// one agent (shown APPLIED in the acks and on the agent page itself, without a reload) and a
// push by selector, each showing the agents' APPLIED / FAILED as it comes back.
// Usage: node ui_test.mjs http://127.0.0.1:UI_PORT   (prints "ui: N passed, M failed")
import { createRequire } from "node:module";
import path from "node:path";

const cache = process.env.OPAMP_INTEROP_CACHE || path.resolve(import.meta.dirname, "../../.cache/interop");
const require = createRequire(path.join(cache, "node", "package.json"));
const { chromium } = require("playwright-core");

const base = process.argv[2];
let passed = 0, failed = 0;
function check(name, ok, detail = "") {
  if (ok) passed++; else failed++;
  console.log(`${ok ? "PASS" : "FAIL"} ui: ${name}${ok || !detail ? "" : `: ${detail}`}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(15000);
  // The server's Content-Security-Policy allows only the UI's own script and style files.
  const cspViolations = [];
  page.on("console", m => { if (/Content.Security.Policy/i.test(m.text())) cspViolations.push(m.text()); });
  await page.goto(base + "/");
  await page.waitForSelector("#agents tr.agent");
  const rows = await page.$$eval("#agents tr.agent", trs => trs.map(tr => tr.dataset.uid));
  check("agent list shows agents", rows.length > 0, `${rows.length} rows`);

  // An agent page, then a push to that agent: its status comes back in the page.
  const uid = await page.$$eval("#agents tr.agent", trs => {
    const rs = trs.find(tr => tr.textContent.includes("rs-ws-agent"));
    return rs && rs.dataset.uid;
  });
  // Click while a list refresh is in flight: hold the list's next refresh at the network,
  // click, then let the stale answer through. The agent page must stay.
  let release, refreshed;
  const held = new Promise(r => (release = r));
  const inFlight = new Promise(r => (refreshed = r));
  await page.route("**/api/v1/agents", async route => {
    refreshed(route.request());
    await held;
    await route.continue().catch(() => {}); // the UI may have aborted it: nothing to answer
  });
  const stale = await inFlight;
  const staleDone = Promise.race([
    page.waitForEvent("requestfinished", r => r === stale),
    page.waitForEvent("requestfailed", r => r === stale),
  ]);
  await page.click(`a[href="#/agents/${uid}"]`);
  await page.waitForSelector("text=Identifying attributes");
  release();
  await staleDone;
  await page.unroute("**/api/v1/agents");
  // The stale answer, if the UI still took it, is rendered within a task of its arrival.
  await page.evaluate(() => new Promise(r => setTimeout(r, 200)));
  const shown = await page.evaluate(() => ({
    hash: location.hash,
    list: !!document.querySelector("#agents"),
    agent: document.body.textContent.includes("Identifying attributes"),
  }));
  check("agent clicked during a list refresh shows the agent page", shown.agent && !shown.list
        && shown.hash === `#/agents/${uid}`, JSON.stringify(shown));

  check("agent page shows attributes and health", (await page.textContent("main")).includes("service.name")
        && (await page.textContent("main")).includes("healthy"));
  await page.fill("#body", "processors:\n  batch: {}\n");
  await page.click("#push button[type=submit]");
  await page.waitForSelector("#result code");
  const pushed = await page.getAttribute("#result code", "title");
  await page.waitForSelector("#acks .ok", { timeout: 20000 });
  check("push to one agent shows APPLIED", (await page.textContent("#acks")).includes("APPLIED"));
  // The agent page itself (its Remote config status) catches up without a reload.
  const applied = await page.waitForFunction(hash => [...document.querySelectorAll("section")].some(sec => {
    const h2 = sec.querySelector("h2");
    return h2 && h2.textContent === "Remote config status" && sec.textContent.includes("APPLIED")
      && sec.querySelector(`code[title="${hash}"]`);
  }), pushed, { timeout: 20000 }).then(() => true, e => String(e));
  check("agent page shows APPLIED for the pushed hash without a reload", applied === true, applied);

  // A push by selector with a config the agents refuse: FAILED with the message.
  await page.click('nav a[href="#/config"]');
  await page.fill("#selector", "service.version=0.1.0");
  // Above the configs the earlier checks made ("all", and "fail-..." at priority 10).
  await page.fill("#priority", "100");
  await page.fill("#body", "INVALID: from the ui\n");
  await page.click("#push button[type=submit]");
  await page.waitForFunction(() => {
    const acks = document.querySelector("#acks");
    return acks && acks.querySelectorAll("tbody tr").length > 0 && !acks.textContent.includes("pending");
  }, null, { timeout: 45000 });
  const text = await page.textContent("#acks");
  const n = await page.$$eval("#acks tbody tr", trs => trs.length);
  // The agent pushed to above runs its own config, which wins over named configs.
  check("push by selector reaches every matching agent without its own config", n === rows.length - 1, `${n} of ${rows.length}`);
  check("every agent shows FAILED with its message", (text.match(/FAILED/g) || []).length === n && text.includes("INVALID"),
        text.slice(0, 300));
  check("the UI runs under the server's CSP", cspViolations.length === 0, cspViolations.join("; ").slice(0, 300));
  if (process.env.OPAMP_UI_SCREENSHOT) await page.screenshot({ path: process.env.OPAMP_UI_SCREENSHOT, fullPage: true });
} catch (e) {
  check("ui flow", false, String(e));
} finally {
  await browser.close();
}
console.log(`ui: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
