#!/usr/bin/env python3
"""Loads an audit.kafka topic into SQLite, one row per chained line (byte-identical re-sends
kept once), and answers "who saw patient X" with the query documented in docs/audit-sinks.md.

    audit-topic-to-sqlite.py --bootstrap HOST:PORT --topic fhir-audit --db audit.db [--who-saw Patient/X]

Needs confluent-kafka (pip install confluent-kafka). Reads every partition from the beginning to
its end now; run it again to load what came since (rows already there are skipped). Extra
librdkafka settings (SASL for Event Hubs): --property name=value, repeatable.
"""
import argparse
import json
import sqlite3
import sys
import uuid

from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

WHO_SAW = """
SELECT json_extract(a.line, '$.event.recorded')                   AS recorded,
       json_extract(g.value, '$.who.identifier.value')            AS user_id,
       json_extract(g.value, '$.who.reference')                   AS fhir_user,
       json_extract(a.line, '$.event.subtype[0].code')            AS interaction,
       json_extract(a.line, '$.event.outcome')                    AS outcome,
       a.instance, a.seq
FROM audit_line a,
     json_each(a.line, '$.event.entity') e,
     json_each(a.line, '$.event.agent') g
WHERE json_extract(e.value, '$.role.code') = '1'
  AND json_extract(e.value, '$.what.reference') = :patient
  AND json_extract(g.value, '$.requestor') = 1
ORDER BY recorded, a.instance, a.seq
"""


def load(args):
    db = sqlite3.connect(args.db)
    db.execute(
        "CREATE TABLE IF NOT EXISTS audit_line (instance TEXT NOT NULL, seq INTEGER NOT NULL, "
        "line TEXT NOT NULL, PRIMARY KEY (instance, seq))"
    )
    conf = {
        "bootstrap.servers": args.bootstrap,
        "group.id": "audit-load-" + uuid.uuid4().hex,
        "enable.auto.commit": False,
    }
    for p in args.property:
        k, v = p.split("=", 1)
        conf[k] = v
    c = Consumer(conf)
    md = c.list_topics(args.topic, timeout=10)
    parts = sorted(md.topics[args.topic].partitions)
    loaded = conflicts = 0
    for p in parts:
        low, high = c.get_watermark_offsets(TopicPartition(args.topic, p), timeout=10)
        if high <= low:
            continue
        c.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING)])
        # The end: past the watermark read at the start, then 3 s without a message (some
        # brokers report the watermark late); 60 s without a message before it is an error.
        reached, quiet = False, 0
        while quiet < (15 if reached else 300):
            m = c.poll(0.2)
            if m is None or m.error():
                quiet += 1 if m is None else 0
                continue
            quiet = 0
            reached = reached or m.offset() + 1 >= high
            line = m.value().decode()
            rec = json.loads(line)
            old = db.execute(
                "SELECT line FROM audit_line WHERE instance = ? AND seq = ?",
                (rec["instance"], rec["seq"]),
            ).fetchone()
            if old is None:
                db.execute("INSERT INTO audit_line VALUES (?, ?, ?)", (rec["instance"], rec["seq"], line))
                loaded += 1
            elif old[0] != line:
                # Not a re-send: two lines claim one place in the chain (run audit verify).
                conflicts += 1
                print(f"CONFLICT {rec['instance']} seq {rec['seq']} at {args.topic}[{p}]@{m.offset()}", file=sys.stderr)
        if not reached:
            sys.exit(f"{args.topic}[{p}]: nothing read for 60 s before offset {high}")
    c.close()
    db.commit()
    print(f"{loaded} line(s) loaded, {conflicts} conflict(s)", file=sys.stderr)
    return db, conflicts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--who-saw", metavar="Patient/ID")
    ap.add_argument("--property", action="append", default=[])
    args = ap.parse_args()
    db, conflicts = load(args)
    if args.who_saw:
        for row in db.execute(WHO_SAW, {"patient": args.who_saw}):
            print(json.dumps(dict(zip(["recorded", "user_id", "fhir_user", "interaction", "outcome", "instance", "seq"], row))))
    sys.exit(1 if conflicts else 0)


if __name__ == "__main__":
    main()
