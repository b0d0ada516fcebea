// The official OpenAI Node SDK against a running llmgw, run by
// crates/server/tests/sdk.rs: chat (plain, streamed without and with
// `stream_options.include_usage`) and embeddings.
//
// Usage: node sdk.mjs GATEWAY_URL API_KEY OUT_DIR [SDK_DIR]
// SDK_DIR holds node_modules/openai (default: this script's directory).
// Prints one JSON line: what the client got. The bytes the SDK sent are kept
// in OUT_DIR as `{x-request-id}.body` and `.head`, through the client's
// documented `fetch` option; the SDK itself is used unchanged.
import { writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const [gateway, apiKey, outdir, sdkDir = dirname(fileURLToPath(import.meta.url))] =
  process.argv.slice(2);
const { OpenAI } = createRequire(join(sdkDir, "package.json"))("openai");

async function recordingFetch(url, init = {}) {
  const headers = new Headers(init.headers);
  const rid = headers.get("x-request-id");
  if (rid) {
    if (typeof init.body !== "string") {
      throw new Error(`${rid}: expected a JSON string body, got ${typeof init.body}`);
    }
    writeFileSync(join(outdir, `${rid}.body`), init.body);
    writeFileSync(
      join(outdir, `${rid}.head`),
      JSON.stringify({
        method: init.method ?? "GET",
        path: new URL(String(url)).pathname,
        content_type: headers.get("content-type") ?? "",
      }),
    );
  }
  return fetch(url, init);
}

const client = new OpenAI({
  baseURL: `${gateway}/v1`,
  apiKey,
  maxRetries: 0,
  timeout: 30_000,
  fetch: recordingFetch,
});
const rid = (name) => ({ headers: { "x-request-id": `node-${name}` } });

async function chunks(stream) {
  const got = { text: "", usage: [], empty_choices: 0 };
  for await (const c of stream) {
    if (c.usage != null) got.usage.push(c.usage);
    if (c.choices.length === 0) got.empty_choices += 1;
    for (const ch of c.choices) got.text += ch.delta?.content ?? "";
  }
  return got;
}

const messages = [{ role: "user", content: "count to three" }];
const out = {};
const r = await client.chat.completions.create(
  { model: "mycompany/meta-llama/Llama-3-8B", messages: [{ role: "user", content: "hi" }], temperature: 0.2 },
  rid("chat"),
);
out.chat = { content: r.choices[0].message.content, usage: r.usage };
out.chat_stream = await chunks(
  await client.chat.completions.create({ model: "mycompany/oai", messages, stream: true }, rid("chat-stream")),
);
out.chat_stream_usage = await chunks(
  await client.chat.completions.create(
    { model: "mycompany/oai", messages, stream: true, stream_options: { include_usage: true } },
    rid("chat-stream-usage"),
  ),
);
const e = await client.embeddings.create(
  { model: "mycompany/text-embedding-3-small", input: ["a", "b"] },
  rid("embeddings"),
);
out.embeddings = { vector: Array.from(e.data[0].embedding), usage: e.usage };
console.log(JSON.stringify(out));
