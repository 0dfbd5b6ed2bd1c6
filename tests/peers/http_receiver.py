"""A local HTTP peer for the end-to-end tests: webhook receiver, generic SMS
gateway and Twilio Messages API, on 127.0.0.1 only.

Prints `listening on PORT` once it serves. Every request is recorded and
`GET /_requests` returns them all as JSON, oldest first; `GET /_count` says
how many there are. Each record has the `path`, `headers`, `body`, the plan's
`answer` and the `status` sent (set just before the answer goes out, so it is
there once the client has its answer; absent while a request hangs).
Webhooks (any path under /hook or /chaos) are verified with the official
`standardwebhooks` package, independently of the signer under test, against
the secret given with --secret.

A path under /hook may carry a plan of answers, used in order per `webhook-id`
(or per request when there is none), the last one repeating: `/hook/500,200`,
`/hook/429:2,200` (429 with `Retry-After: 2`), `/hook/hang,200` (no answer for
--hang seconds, then 200), `/hook/400`.

A path under /chaos answers at random, seeded: `/chaos/P` answers P percent of
requests with 500 and hangs on another 5 percent (--hang seconds, then 503: a
client with a shorter timeout sees no answer), `/chaos/P,H` hangs on H
percent; the rest get 200. Each draw depends only on --seed, the `webhook-id`
and how many requests with that id came before, so the same ids get the same
answers in every run, however the requests interleave.

`POST /_control` with `{"healthy": true}` makes every /hook and /chaos path
answer 200 at once, whatever its plan (`{"healthy": false}` restores the
plans); it answers with the current settings and is not recorded.

The fake Twilio Messages API answers with a sid `SM` + 32 hex digits, unless
`POST /_twilio_sids` (not recorded) named one for the message's `To` number:
`{"+27831234567": "SM0001..."}`, so a test can produce the sids of Twilio
status callback samples. `POST /_twilio_hang` (not recorded) with
`{"+27831234567": 1}` makes the next send to that number create the message
and then hang (--hang seconds) before answering, as a send whose answer is
lost. `GET .../Messages.json?To=&From=` lists the messages created, newest
first, in Twilio's shape (recorded, with `method` GET).
"""

import argparse
import base64
import datetime
import email.utils
import json
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

parser = argparse.ArgumentParser()
parser.add_argument("--secret", required=True)
parser.add_argument("--hang", type=float, default=5.0)
parser.add_argument("--seed", default="switchboard")
args = parser.parse_args()

lock = threading.Lock()
requests = []
attempts = {}
control = {"healthy": False}
twilio_sids = {}
twilio_hang = {}
twilio_messages = []
verifier = Webhook(args.secret)


def chaos_answer(plan, key, attempt):
    """The answer of the chaos plan `P` or `P,H` to attempt `attempt` of `key`."""
    fail, _, hang = plan.partition(",")
    fail = float(fail) / 100
    hang = float(hang) / 100 if hang else 0.05
    draw = random.Random(f"{args.seed}/{key}/{attempt}").random()
    if draw < hang:
        return "hang"
    if draw < hang + fail:
        return "500"
    return "200"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client stopped waiting (its timeout, or it exited) while we hung.
            self.close_connection = True

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if self.path == "/_requests":
            with lock:
                self.reply(200, requests)
        elif self.path == "/_count":
            with lock:
                self.reply(200, {"count": len(requests)})
        elif url.path.startswith("/2010-04-01/Accounts/") and url.path.endswith("/Messages.json"):
            headers = {k.lower(): v for k, v in self.headers.items()}
            query = dict(urllib.parse.parse_qsl(url.query))
            record = {"method": "GET", "path": url.path, "headers": headers, "query": query,
                      "body": "", "at_ms": time.time_ns() // 1_000_000}
            with lock:
                requests.append(record)
                listed = [m for m in reversed(twilio_messages)
                          if m["to"] == query.get("To")
                          and query.get("From") in (None, m["from"])]
            if not self.twilio_authorized(headers, url.path):
                self.answer(record, 401, {"code": 20003, "message": "Authenticate"})
            else:
                self.answer(record, 200, {"messages": listed, "page": 0,
                                          "page_size": int(query.get("PageSize", 50))})
        else:
            self.reply(404, {"error": "not found"})

    def twilio_authorized(self, headers, path):
        sid = path.split("/")[3]
        expected = "Basic " + base64.b64encode(f"{sid}:twilio-token".encode()).decode()
        return headers.get("authorization", "") == expected

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        raw = self.rfile.read(length)
        path = urllib.parse.urlparse(self.path).path
        if path == "/_control":
            settings = json.loads(raw or b"{}")
            with lock:
                if "healthy" in settings:
                    control["healthy"] = bool(settings["healthy"])
                current = dict(control)
            self.reply(200, current)
            return
        if path == "/_twilio_sids":
            with lock:
                twilio_sids.update(json.loads(raw))
                current = dict(twilio_sids)
            self.reply(200, current)
            return
        if path == "/_twilio_hang":
            with lock:
                twilio_hang.update(json.loads(raw))
                current = dict(twilio_hang)
            self.reply(200, current)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = {
            "method": "POST",
            "path": path,
            "headers": headers,
            "body": raw.decode("utf-8", "replace"),
            "at_ms": time.time_ns() // 1_000_000,
        }
        if "x-www-form-urlencoded" in headers.get("content-type", ""):
            record["form"] = dict(urllib.parse.parse_qsl(raw.decode()))
        parts = path.strip("/").split("/")
        webhook = parts[0] in ("hook", "chaos")
        if webhook:
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
            healthy = control["healthy"]
        if webhook and healthy:
            answer = "200"
        elif parts[0] == "chaos" and len(parts) > 1:
            answer = chaos_answer(parts[1], key, attempt)
        else:
            plan = parts[1].split(",") if parts[0] == "hook" and len(parts) > 1 else ["200"]
            answer = plan[min(attempt, len(plan) - 1)]
        record["answer"] = answer
        with lock:
            requests.append(record)
        if answer == "hang":
            time.sleep(args.hang)
            answer = "503" if parts[0] == "chaos" else "200"
        status, _, retry_after = answer.partition(":")
        status = int(status)
        extra = [("retry-after", retry_after)] if retry_after else []
        if path.startswith("/2010-04-01/Accounts/"):
            # Twilio's Messages API answers 201 with the message's sid.
            form = record.get("form", {})
            if not self.twilio_authorized(headers, path):
                self.answer(record, 401, {"code": 20003, "message": "Authenticate"})
            elif not form.get("To", "").startswith("+"):
                self.answer(record, 400, {"code": 21211, "message": "Invalid 'To' Phone Number"})
            else:
                with lock:
                    sid = twilio_sids.get(form["To"]) or "SM" + format(len(requests), "032x")
                    twilio_messages.append({
                        "sid": sid, "to": form["To"], "from": form.get("From"),
                        "body": form.get("Body"), "status": "queued",
                        "messaging_service_sid": form.get("MessagingServiceSid"),
                        "date_created": email.utils.format_datetime(
                            datetime.datetime.now(datetime.timezone.utc)),
                    })
                    hang = twilio_hang.get(form["To"], 0) > 0
                    if hang:
                        twilio_hang[form["To"]] -= 1
                if hang:
                    record["answer"] = "hang"
                    time.sleep(args.hang)
                self.answer(record, 201, {"sid": sid, "status": "queued"})
        elif path.startswith("/sms"):
            self.answer(record, status, {"id": f"gw-{len(requests)}"}, extra)
        else:
            self.answer(record, status, {"received": True} if status < 300 else {"error": answer}, extra)

    def answer(self, record, status, body, headers=()):
        """Records the status, then sends it."""
        with lock:
            record["status"] = status
        self.reply(status, body, headers)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
