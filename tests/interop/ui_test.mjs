// Drives the reference server's web UI in headless Chromium (Debian's, through playwright-core):
// the agent list, an agent page, a push to one agent and a push by selector, each showing the
// agents' APPLIED / FAILED as it comes back.
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
  await page.goto(base + "/");
  await page.waitForSelector("#agents tr.agent");
  const rows = await page.$$eval("#agents tr.agent", trs => trs.map(tr => tr.dataset.uid));
  check("agent list shows agents", rows.length > 0, `${rows.length} rows`);

  // An agent page, then a push to that agent: its status comes back in the page.
  const uid = await page.$$eval("#agents tr.agent", trs => {
    const rs = trs.find(tr => tr.textContent.includes("rs-ws-agent"));
    return rs && rs.dataset.uid;
  });
  await page.click(`a[href="#/agents/${uid}"]`);
  await page.waitForSelector("text=Identifying attributes");
  check("agent page shows attributes and health", (await page.textContent("main")).includes("service.name")
        && (await page.textContent("main")).includes("healthy"));
  await page.fill("#body", "processors:\n  batch: {}\n");
  await page.click("#push button[type=submit]");
  await page.waitForSelector("#acks .ok", { timeout: 20000 });
  check("push to one agent shows APPLIED", (await page.textContent("#acks")).includes("APPLIED"));

  // A push by selector with a config the agents refuse: FAILED with the message.
  await page.click('nav a[href="#/config"]');
  await page.fill("#selector", "service.version=0.1.0");
  await page.fill("#body", "INVALID: from the ui\n");
  await page.click("#push button[type=submit]");
  await page.waitForFunction(() => {
    const acks = document.querySelector("#acks");
    return acks && acks.querySelectorAll("tbody tr").length > 0 && !acks.textContent.includes("pending");
  }, null, { timeout: 45000 });
  const text = await page.textContent("#acks");
  const n = await page.$$eval("#acks tbody tr", trs => trs.length);
  check("push by selector reaches every matching agent", n === rows.length, `${n} of ${rows.length}`);
  check("every agent shows FAILED with its message", (text.match(/FAILED/g) || []).length === n && text.includes("INVALID"),
        text.slice(0, 300));
  if (process.env.OPAMP_UI_SCREENSHOT) await page.screenshot({ path: process.env.OPAMP_UI_SCREENSHOT, fullPage: true });
} catch (e) {
  check("ui flow", false, String(e));
} finally {
  await browser.close();
}
console.log(`ui: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
