// Drives Debian's headless Chromium through the chat page of real edge-server processes and prints
// one JSON object of observations on stdout; tests/e2e/test_chat_page.py asserts on it.
//
//   node chat_page.js '{"scripted": URL, "tiny": URL, "apiKey": KEY, "demo": URL, "vision": URL,
//                       "imagePath": PNG, "userDataDir": DIR, "outDir": DIR}'
//
// scripted: a server on the scripted model (greedy reply == SCRIPT_TEXT), no API key.
// tiny:     a server on a random model that never stops by itself, started with --api-key KEY.
// demo:     the offline demo server (its /v1/models carries meta.warning).
// vision:   a server whose model sees images (--mmproj); imagePath: a PNG to attach.
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

const config = JSON.parse(process.argv[2]);
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const result = { consoleErrors: [], pageErrors: [], requests: [] };
let phase = "start";

function watch(page) {
  page.on("console", (msg) => {
    if (msg.type() === "error") result.consoleErrors.push({ phase, text: msg.text() });
  });
  page.on("pageerror", (error) => result.pageErrors.push({ phase, text: String(error) }));
  page.on("request", (request) => result.requests.push(request.url()));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const metaCount = (page) => page.locator(".msg.assistant .meta").count();
const lastReply = (page) => page.locator(".msg.assistant .text").last().textContent();

async function waitForReply(page, count) {
  await page.waitForFunction((n) => document.querySelectorAll(".msg.assistant .meta").length === n
    && document.body.dataset.state === "idle", count);
  const meta = page.locator(".msg.assistant .meta").last();
  return {
    text: await lastReply(page),
    meta: await meta.textContent(),
    tokensPerSecond: Number(await meta.getAttribute("data-tokens-per-second")),
    request: JSON.parse(await page.evaluate(() => document.body.dataset.lastRequest)),
  };
}

async function send(page, text) {
  await page.locator("#prompt").fill(text);
  await page.locator("#prompt").press("Enter");
}

async function scriptedServer(context) {
  const page = await context.newPage();
  watch(page);
  phase = "load";
  const response = await page.goto(config.scripted);
  result.pageHeaders = response.headers();
  await page.waitForSelector("#model[data-id]");
  result.modelShown = await page.locator("#model").textContent();
  result.warningHiddenOnRealModel = await page.locator("#warning").isHidden();
  result.attachHiddenOnTextModel = await page.locator("#attach").isHidden();

  // Every change to the reply's text node, with the text it had before: the states the page went through.
  await page.evaluate(() => {
    window.replyStates = [];
    new MutationObserver((records) => {
      for (const record of records) {
        if (record.type === "characterData") window.replyStates.push(record.oldValue, record.target.data);
      }
    }).observe(document.getElementById("log"), { subtree: true, characterData: true, characterDataOldValue: true });
  });
  phase = "chat";
  await page.locator("#system").fill("You are a terse assistant.");
  await page.locator("#temperature").fill("0");
  await send(page, "Hello there");
  result.first = await waitForReply(page, 1);
  result.first.states = [...new Set(await page.evaluate(() => window.replyStates))];
  result.promptFocusedAfterReply = await page.evaluate(() => document.activeElement.id);

  phase = "history";
  await send(page, "Say it again");
  result.second = await waitForReply(page, 2);
  result.bubbles = await page.locator(".msg").evaluateAll((nodes) => nodes.map((n) => n.className));

  phase = "error";
  await page.locator("#temperature").fill("5");
  await send(page, "Too hot");
  await page.waitForSelector(".msg.error");
  await page.waitForFunction(() => document.body.dataset.state === "idle");
  result.error = {
    shown: await page.locator(".msg.error").textContent(),
    promptRestored: await page.locator("#prompt").inputValue(),
    request: JSON.parse(await page.evaluate(() => document.body.dataset.lastRequest)),
  };
  await page.screenshot({ path: path.join(config.outDir, "chat.png") });
  await page.close();
}

async function tinyServer(context) {
  const page = await context.newPage();
  watch(page);
  phase = "api-key";
  await page.goto(config.tiny);
  await page.waitForFunction(() => document.getElementById("model-status").textContent !== "");
  result.withoutKey = await page.locator("#model-status").textContent();
  await page.locator("#api-key").fill(config.apiKey);
  await page.locator("#api-key").press("Tab");  // "change" reloads the model with the key
  await page.waitForSelector("#model[data-id]");
  result.tinyModelShown = await page.locator("#model").textContent();

  phase = "stop";
  await page.locator("#max-tokens").fill("100000");
  await send(page, "Tell me a very long story");
  const text = page.locator(".msg.assistant .text").last();
  await page.waitForFunction(() => (document.querySelector(".msg.assistant .text").textContent || "").length > 0);
  const early = (await text.textContent()).length;
  await sleep(400);
  const later = (await text.textContent()).length;
  result.stop = { early, later, stateWhileStreaming: await page.evaluate(() => document.body.dataset.state) };
  const clicked = Date.now();
  await page.locator("#stop").click();
  await page.waitForFunction(() => document.body.dataset.state === "idle");
  result.stop.uiIdleMs = Date.now() - clicked;
  let health = null;
  while (Date.now() - clicked < 5000) {
    health = await (await fetch(config.tiny + "/health")).json();
    if (health.running === 0 && health.queued === 0) break;
    await sleep(20);
  }
  result.stop.serverIdleMs = Date.now() - clicked;
  result.stop.health = health;
  result.stop.finalLength = (await text.textContent()).length;
  result.stop.meta = await page.locator(".msg.assistant .meta").last().textContent();
  result.stop.stopDisabled = await page.locator("#stop").isDisabled();
  result.stop.sendEnabled = await page.locator("#send").isEnabled();
  await page.screenshot({ path: path.join(config.outDir, "stopped.png") });
  await page.close();
}

async function demoServer(context) {
  const page = await context.newPage();
  watch(page);
  phase = "demo";
  await page.goto(config.demo);
  await page.waitForSelector("#model[data-id]");
  result.demo = {
    model: await page.locator("#model").textContent(),
    warningVisible: await page.locator("#warning").isVisible(),
    warning: await page.locator("#warning").textContent(),
  };
  await page.screenshot({ path: path.join(config.outDir, "demo.png") });
  await page.close();
}

async function visionServer(context) {
  const page = await context.newPage();
  watch(page);
  phase = "vision";
  await page.goto(config.vision);
  await page.waitForSelector("#model[data-id]");
  result.vision = { attachVisible: await page.locator("#attach").isVisible() };
  await page.locator("#temperature").fill("0");
  await page.locator("#max-tokens").fill("8");
  // The file picker (the button opens it; Playwright fills it as a user's choice would)...
  const chooser = page.waitForEvent("filechooser");
  await page.locator("#attach").click();
  await (await chooser).setFiles(config.imagePath);
  await page.waitForFunction(() => document.querySelectorAll("#attachments img").length === 1);
  // ...and a paste of the same bytes as an image file into the message box.
  const bytes = [...require("fs").readFileSync(config.imagePath)];
  await page.locator("#prompt").evaluate((prompt, data) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([new Uint8Array(data)], "pasted.png", { type: "image/png" }));
    prompt.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }));
  }, bytes);
  await page.waitForFunction(() => document.querySelectorAll("#attachments img").length === 2);
  result.vision.pastedText = await page.locator("#prompt").inputValue();
  await send(page, "What is in these pictures?");
  result.vision.first = await waitForReply(page, 1);
  result.vision.attachmentsAfterSend = await page.locator("#attachments img").count();
  await send(page, "And now?");
  result.vision.second = await waitForReply(page, 2);
  result.vision.thumbnails = await page.locator(".msg.user").evaluateAll((nodes) => nodes.map(
    (node) => [...node.querySelectorAll(".images img")].map((img) => img.naturalWidth)));
  await page.screenshot({ path: path.join(config.outDir, "vision.png") });
  await page.close();
}

(async () => {
  const context = await chromium.launchPersistentContext(config.userDataDir, {
    executablePath: "/usr/bin/chromium", headless: true, args: ARGS,
    viewport: { width: 1100, height: 700 }, timeout: 30000,
  });
  context.setDefaultTimeout(15000);
  try {
    await scriptedServer(context);
    await tinyServer(context);
    await demoServer(context);
    await visionServer(context);
  } catch (error) {
    result.fatal = `${phase}: ${error.stack || error}`;
    for (const page of context.pages()) {
      await page.screenshot({ path: path.join(config.outDir, "failure.png") }).catch(() => {});
    }
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(result.fatal ? 1 : 0);
})();
