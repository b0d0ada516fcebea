"""Sends N chat requests to the gateway over one keep-alive connection."""
import http.client
import json
import sys

port, key, n, stream = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "stream"
body = json.dumps({"model": "mock/m", "stream": stream,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    conn.request("POST", "/v1/chat/completions", body,
                 {"authorization": "Bearer " + key, "content-type": "application/json"})
    res = conn.getresponse()
    data = res.read()
    if res.status != 200:
        sys.exit(f"status {res.status}: {data[:300]!r}")
