"""A local HTTP peer for the end-to-end tests: webhook receiver, generic SMS
gateway and Twilio Messages API, on 127.0.0.1 only.

Prints `listening on PORT` once it serves. Every request is recorded and
`GET /_requests` returns them all as JSON. Webhooks (any path under /hook) are
verified with the official `standardwebhooks` package, independently of the
signer under test, against the secret given with --secret.

A path may carry a plan of answers, used in order per `webhook-id` (or per
request when there is none), the last one repeating: `/hook/500,200`,
`/hook/429:2,200` (429 with `Retry-After: 2`), `/hook/hang,200` (no answer for
--hang seconds), `/hook/400`.
"""

import argparse
import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

parser = argparse.ArgumentParser()
parser.add_argument("--secret", required=True)
parser.add_argument("--hang", type=float, default=5.0)
args = parser.parse_args()

lock = threading.Lock()
requests = []
attempts = {}
verifier = Webhook(args.secret)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/_requests":
            with lock:
                self.reply(200, requests)
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        raw = self.rfile.read(length)
        path = urllib.parse.urlparse(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = {"path": path, "headers": headers, "body": raw.decode("utf-8", "replace")}
        if "x-www-form-urlencoded" in headers.get("content-type", ""):
            record["form"] = dict(urllib.parse.parse_qsl(raw.decode()))
        if path.startswith("/hook"):
            try:
                verifier.verify(raw, headers)
                record["verified"] = True
            except WebhookVerificationError as e:
                record["verified"] = False
                record["verify_error"] = str(e)
        key = headers.get("webhook-id") or headers.get("idempotency-key") or str(time.time_ns())
        with lock:
            attempt = attempts.get((path, key), 0)
            attempts[(path, key)] = attempt + 1
        parts = path.strip("/").split("/")
        plan = parts[1].split(",") if parts[0] == "hook" and len(parts) > 1 else ["200"]
        answer = plan[min(attempt, len(plan) - 1)]
        record["answer"] = answer
        with lock:
            requests.append(record)
        if answer == "hang":
            time.sleep(args.hang)
            answer = "200"
        status, _, retry_after = answer.partition(":")
        status = int(status)
        extra = [("retry-after", retry_after)] if retry_after else []
        if path.startswith("/2010-04-01/Accounts/"):
            # Twilio's Messages API answers 201 with the message's sid.
            auth = headers.get("authorization", "")
            sid = path.split("/")[3]
            expected = "Basic " + base64.b64encode(f"{sid}:twilio-token".encode()).decode()
            if auth != expected:
                self.reply(401, {"code": 20003, "message": "Authenticate"})
            elif not record.get("form", {}).get("To", "").startswith("+"):
                self.reply(400, {"code": 21211, "message": "Invalid 'To' Phone Number"})
            else:
                self.reply(201, {"sid": "SM" + format(len(requests), "032x"), "status": "queued"})
        elif path.startswith("/sms"):
            self.reply(status, {"id": f"gw-{len(requests)}"}, extra)
        else:
            self.reply(status, {"received": True} if status < 300 else {"error": answer}, extra)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
