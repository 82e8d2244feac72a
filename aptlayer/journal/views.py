"""Documented audit views (docs/journal.md), created by a schema migration.

They are part of the public schema: administrators query them with
``apt-layer audit``, ``sqlite3`` or ``sqlite-utils``. Change one only through
a new migration.
"""

from __future__ import annotations

VIEWS: dict[str, str] = {
    "v_events": """
        SELECT e.seq, e.at, e.tx, e.kind, e.subject, e.data, e.actor, e.hash,
               json_extract(e.data, '$.digest') AS digest,
               json_extract(e.actor, '$.user') AS user,
               json_extract(e.actor, '$.uid') AS uid,
               json_extract(e.actor, '$.pid') AS pid,
               json_extract(e.actor, '$.host') AS host,
               json_extract(e.actor, '$.boot_id') AS boot_id,
               (SELECT group_concat(a.value, ' ') FROM json_each(e.actor, '$.argv') AS a) AS command
        FROM events AS e""",
    "v_history": """
        SELECT seq, at, kind, subject, tx, digest, user, host, command
        FROM v_events
        WHERE kind NOT LIKE 'recover.%' AND kind NOT LIKE 'drift.%' AND kind != 'gc.begun'""",
    "v_images": """
        SELECT i.name, i.digest, i.size, m.objects, m.size AS objects_size,
               i.created_seq, i.created_at, i.tx,
               (SELECT group_concat(d.slot) FROM deployments AS d
                 WHERE d.image = i.name AND d.digest = i.digest) AS deployed,
               (SELECT count(*) FROM mounts AS mt
                 WHERE mt.digest = i.digest AND mt.state = 'mounted') AS mounts
        FROM images AS i JOIN images_manifest AS m ON m.digest = i.digest""",
    "v_object_usage": """
        SELECT o.object, o.size, o.refcount,
               (SELECT count(*) FROM image_objects AS io JOIN images AS i ON i.digest = io.digest
                 WHERE io.object = o.object) AS live_images
        FROM object_refs AS o""",
    "v_garbage": """
        SELECT object, size FROM object_refs WHERE refcount = 0""",
    "v_transactions": """
        SELECT t.id, t.state, t.explicit, t.begun_seq, t.begun_at, t.ended_seq, t.ended_at,
               (SELECT count(*) FROM tx_ops AS o WHERE o.tx = t.id) AS ops
        FROM transactions AS t""",
    "v_actors": """
        SELECT user, uid, host, count(*) AS events, min(at) AS first_at, max(at) AS last_at
        FROM v_events GROUP BY user, uid, host""",
}
