// The official OpenAI Node SDK against limited keys of a running llmgw, run
// by crates/server/tests/sdk.rs: a key out of requests (RateLimitError and
// its x-ratelimit-* headers), a concurrency refusal under the SDK's default
// retries, and an insufficient_quota refusal.
//
// Usage: node limits.mjs GATEWAY_URL RPM_KEY BUSY_KEY QUOTA_KEY [SDK_DIR]
// SDK_DIR holds node_modules/openai (default: this script's directory).
// Prints one JSON line: what the client got.
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const [gateway, rpmKey, busyKey, quotaKey, sdkDir = dirname(fileURLToPath(import.meta.url))] =
  process.argv.slice(2);
const { OpenAI } = createRequire(join(sdkDir, "package.json"))("openai");

const sdk = (apiKey, opts = {}) => new OpenAI({ baseURL: `${gateway}/v1`, apiKey, timeout: 30_000, ...opts });
const rid = (name) => ({ headers: { "x-request-id": `node-${name}` } });
const messages = [{ role: "user", content: "hi" }];
const limitHeaders = (h) =>
  Object.fromEntries(
    [...h.entries()].filter(([k]) => k.startsWith("x-ratelimit-") || k === "retry-after" || k === "x-should-retry"),
  );

// Runs `call`; what the RateLimitError it throws says (anything else is rethrown).
async function refusal(call) {
  const started = performance.now();
  try {
    await call();
    return null;
  } catch (e) {
    if (!(e instanceof OpenAI.RateLimitError)) throw e;
    return {
      class: e.constructor.name,
      status: e.status,
      type: e.type,
      code: e.code,
      headers: limitHeaders(e.headers),
      seconds: (performance.now() - started) / 1000,
    };
  }
}

const out = {};
const c = sdk(rpmKey, { maxRetries: 0 });
const { response } = await c.chat.completions
  .create({ model: "mycompany/m", messages }, rid("rpm-ok"))
  .withResponse();
out.rpm_ok = limitHeaders(response.headers);
out.rpm_refused = await refusal(() => c.chat.completions.create({ model: "mycompany/m", messages }, rid("rpm-refused")));

// The SDK's default retries (maxRetries: 2) from here on.
const b = sdk(busyKey);
const stream = await b.chat.completions.create(
  { model: "mycompany/slowstream-50", messages, stream: true },
  rid("busy-stream"),
);
await stream[Symbol.asyncIterator]().next();
out.busy = await refusal(() => b.chat.completions.create({ model: "mycompany/m", messages }, rid("busy")));
stream.controller.abort();

out.quota = await refusal(() =>
  sdk(quotaKey).chat.completions.create({ model: "mycompany/m", messages }, rid("quota")),
);
console.log(JSON.stringify(out));
