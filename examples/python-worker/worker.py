#!/usr/bin/env python3
"""A conversation worker that emits `poll_complete` events to Switchboard
over NATS JetStream, in Python.

It uses nothing of Switchboard's but the contract: the JSON Schema of the
event (sdk/schema/event.v1.json) and the subject layout
`vumi.events.{account_key}.{conversation_type}.{event_type}`.

    python3 worker.py --nats nats://127.0.0.1:4222 --account acme --count 3

For each publish it prints `ID sequence=N duplicate=false|true`. An event
that breaks the schema is refused before anything is published; a failed
publish is retried with the same `Nats-Msg-Id` (the event id), so JetStream
stores the event once however often it is sent.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import nats
import nats.errors

# The schema of the Switchboard checkout this example sits in; pass --schema
# when you copy the worker elsewhere.
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "sdk" / "schema" / "event.v1.json"
# The contract's default largest event; a dispatcher may be configured otherwise.
MAX_EVENT_BYTES = 256 * 1024
PUBLISH_ATTEMPTS = 5
CONNECT_TIMEOUT = 5.0  # seconds


class WorkerError(Exception):
    """A failure to report in one line and exit non-zero."""


def without_credentials(url: str) -> str:
    """The URL without `user:password@`, fit for messages."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (version 7): 48 bits of Unix milliseconds, then random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return uuid.UUID(int=value)


def poll_complete(account: str, conversation: str, msisdn: str, name: str, score: int) -> dict:
    """A new root `poll_complete` event of a survey, as the contract has it."""
    event_id = str(uuid7())
    return {
        "v": 1,
        "id": event_id,
        "account_key": account,
        "conversation_key": conversation,
        "conversation_type": "survey",
        "event_type": "poll_complete",
        "event_data": {"msisdn": msisdn, "name": name, "score": score},
        # RFC 3339 in UTC, to the microsecond.
        "occurred_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "expires_at": None,
        "parent_id": None,
        "root_id": event_id,  # a root event is its own root
        "depth": 0,
    }


def load_validator(path: Path):
    """A validator for the schema at `path`, of the draft the schema declares
    (2020-12), that checks formats (`date-time`) too."""
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkerError(f"cannot read the event schema {path}: {e}") from e
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # jsonschema checks `date-time` only when rfc3339-validator is installed,
    # and passes any string otherwise: refuse to run without it.
    if "date-time" not in cls.FORMAT_CHECKER.checkers:
        raise WorkerError("jsonschema cannot check date-time: pip install rfc3339-validator")
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check(validator, event: dict) -> bytes:
    """The event encoded, once it is known to follow the contract."""
    error = jsonschema.exceptions.best_match(validator.iter_errors(event))
    if error is not None:
        raise WorkerError(
            f"event {event.get('id')} breaks the event schema at {error.json_path}: "
            f"{error.message}; not published"
        )
    payload = json.dumps(event, separators=(",", ":")).encode()
    if len(payload) > MAX_EVENT_BYTES:
        raise WorkerError(f"event {event['id']} is {len(payload)} bytes, over {MAX_EVENT_BYTES}")
    return payload


async def publish(js, event: dict, payload: bytes, traceparent: str | None = None):
    """Publishes and waits for JetStream's ack; retries with the same
    `Nats-Msg-Id`, so that JetStream drops the copies it already has.
    A W3C `traceparent` (the worker's current span, in a traced worker)
    goes in a header of that name: the dispatcher's spans continue its trace."""
    subject = f"vumi.events.{event['account_key']}.{event['conversation_type']}.{event['event_type']}"
    headers = {"Nats-Msg-Id": event["id"]}
    if traceparent:
        headers["traceparent"] = traceparent
    last = None
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        if attempt > 1:
            await asyncio.sleep(min(0.05 * 2 ** (attempt - 2), 2.0))
        try:
            return await js.publish(subject, payload, timeout=5, headers=headers)
        except nats.errors.Error as e:  # timeouts, no responders, JetStream API errors
            last = e
    raise WorkerError(
        f"publishing event {event['id']} to {subject} failed after {PUBLISH_ATTEMPTS} attempts: "
        f"{type(last).__name__}: {last} (is the dispatcher running? it creates the stream)"
    )


async def run(args) -> None:
    validator = load_validator(args.schema)

    # nats-py retries a refused first connection for minutes (and reports
    # each failure to error_cb); give up sooner, with the reason.
    failures = []

    async def remember(error):
        failures.append(error)

    try:
        nc = await asyncio.wait_for(
            nats.connect(args.nats, inbox_prefix=args.inbox_prefix, error_cb=remember),
            timeout=CONNECT_TIMEOUT,
        )
    except Exception as e:  # nats-py raises several kinds here
        reason = failures[-1] if failures else e
        raise WorkerError(
            f"cannot reach NATS at {without_credentials(args.nats)}: "
            f"{type(reason).__name__}: {reason}"
        ) from e
    try:
        js = nc.jetstream()
        for n in range(1, args.count + 1):
            msisdn, name = f"+2782{n:07}", f"Respondent {n}"
            event = poll_complete(args.account, args.conversation, msisdn, name, args.score)
            payload = check(validator, event)
            for _ in range(2 if args.resend else 1):
                ack = await publish(js, event, payload, args.traceparent)
                duplicate = "true" if ack.duplicate else "false"
                print(f"{event['id']} sequence={ack.seq} duplicate={duplicate}", flush=True)
    finally:
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222",
                        help="the NATS server; credentials may be given in it "
                             "(nats://user:password@host:4222)")
    parser.add_argument("--inbox-prefix", default="_INBOX",
                        help="an inbox prefix the worker's NATS user may subscribe to, "
                             "where JetStream's acks arrive (docs/nats-permissions.md)")
    parser.add_argument("--account", required=True, help="the account the events belong to")
    parser.add_argument("--conversation", default="poll-2026", help="the survey (conversation key)")
    parser.add_argument("--count", type=int, default=3,
                        help="how many events to emit, for respondents 1, 2, ... (+27820000001, ...)")
    parser.add_argument("--score", type=int, default=4, help="each respondent's score")
    parser.add_argument("--resend", action="store_true",
                        help="publish every event twice, as after a lost ack: "
                             "JetStream stores it once and answers duplicate=true")
    parser.add_argument("--traceparent",
                        help="a W3C trace context (00-TRACEID-SPANID-01) to publish with, "
                             "as a traced worker passes its current span's")
    parser.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA,
                        help="the event schema (default: %(default)s)")
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except WorkerError as e:
        print(f"worker.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
