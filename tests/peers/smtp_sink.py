"""A local SMTP sink for the end-to-end tests (aiosmtpd), on 127.0.0.1 only.

Prints `listening on PORT` once it serves. Recipients whose address contains
`reject` are refused with 550. Each accepted message is parsed and written as
JSON (`mail_from`, `rcpt_tos`, `subject`, `headers`, `text`, `html`,
`attachments`: `filename`, `content_type`, `size`, `sha256`) to a file
in the directory given as the first argument.

When that directory holds `queue-ids.conf` (JSON: recipient → queue id), a
message to a listed recipient is answered `250 Ok: queued as ID`, as SendGrid
answers with the X-Message-Id its delivery events carry.

When it holds `held.conf` (JSON: a list of recipients), a message to a listed
recipient is written out, then its answer waits while the list still names
the recipient (up to two minutes): a provider that takes its time to answer, so
that a test can post a delivery report before the sender has its answer.
"""

import asyncio
import email
import email.policy
import hashlib
import json
import os
import socket
import sys
import uuid

from aiosmtpd.controller import Controller

out_dir = sys.argv[1]


class Sink:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if "reject" in address:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        text = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "subject": message["subject"],
            "headers": {k.lower(): str(v) for k, v in message.items()},
            "text": text.get_content() if text is not None else None,
            "html": html.get_content() if html is not None else None,
            "attachments": [
                {
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "size": len(part.get_payload(decode=True)),
                    "sha256": hashlib.sha256(part.get_payload(decode=True)).hexdigest(),
                }
                for part in message.iter_attachments()
            ],
        }
        path = os.path.join(out_dir, f"{uuid.uuid4()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        for _ in range(6000):
            if not set(envelope.rcpt_tos) & set(read_json("held.conf", [])):
                break
            await asyncio.sleep(0.02)
        queue_ids = read_json("queue-ids.conf", {})
        for rcpt in envelope.rcpt_tos:
            if rcpt in queue_ids:
                return f"250 Ok: queued as {queue_ids[rcpt]}"
        return "250 Message accepted for delivery"


def read_json(name, default):
    """The JSON file `name` of the sink's directory, or `default` when absent."""
    try:
        with open(os.path.join(out_dir, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A free port can be taken between finding it and binding it: try again.
for attempt in range(10):
    port = free_port()
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    try:
        controller.start()
        break
    except OSError:
        if attempt == 9:
            raise
print(f"listening on {port}", flush=True)
try:
    asyncio.get_event_loop().run_forever()
except KeyboardInterrupt:
    pass
finally:
    controller.stop()
