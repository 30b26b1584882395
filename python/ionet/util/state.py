"""The state API, as Ray's `ray.util.state`: the tasks of this job's account as the head
last heard of them (their owners report them, batched, within about a second); its
actors, jobs, placement groups and objects (who holds which, asked now); the cluster's
nodes.

    from ionet.util.state import list_tasks, list_actors, summarize_tasks
    list_tasks(filters=[("state", "=", "FAILED")])
    list_actors(filters=[("state", "=", "ALIVE")])

Each task is a dict with Ray's fields: `task_id`, `job_id`, `name`,
`func_or_class_name`, `state`, `type` (`NORMAL_TASK`; `ACTOR_TASK` with its
`actor_id`; `ACTOR_CREATION_TASK`, `Class.__init__`, whose attempts are the actor's
incarnations), `attempt_number`, `node_id`, `error_message`, plus ionet's `worker_address`
and `pending_reason` (why a task waits), and `creation_time_ms`, `start_time_ms`,
`end_time_ms`. A program (holding its job's credential) sees its own job's tasks, its
actor calls among them (`Class.method`). At most 10,000 rows
come from the head per call (filters on other fields apply to those).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ionet import _core, _ionet

# Filters the head applies (with "="); any other is applied here.
_HEAD_FILTERS = {"job_id": "job", "state": "state", "name": "name"}


def _filtered(what: str, rows: List[Dict[str, Any]], filters, limit: int) -> List[Dict[str, Any]]:
    """`rows` that pass Ray's `(key, "=" or "!=", value)` filters (strings in any case), at
    most `limit`."""
    for key, predicate, value in filters or []:
        if predicate not in ("=", "!="):
            raise ValueError(f"filter predicate {predicate!r} is not supported: use '=' or '!='")
        if rows and key not in rows[0]:
            raise ValueError(f"{what} cannot be filtered on {key!r}: the fields are {', '.join(sorted(rows[0]))}")
        # As Ray's: strings match whatever their case; a row without the field matches neither.
        wanted = str(value).lower()
        rows = [
            row for row in rows
            if row.get(key) is not None and (str(row[key]).lower() == wanted) == (predicate == "=")
        ]
    return rows[: int(limit)]


def _listing(what: str) -> List[Dict[str, Any]]:
    _core.ensure_initialized()
    return json.loads(_ionet.list_state(what))


def list_actors(filters=None, limit: int = 10_000, detail: bool = False, **_ray_options: Any) -> List[Dict[str, Any]]:
    """This job's account's actors, dead ones too (Ray's fields: `actor_id`, `class_name`,
    `name`, `state`, `job_id`, `node_id`, `death_cause`, …)."""
    return _filtered("actors", _listing("actors"), filters, limit)


def get_actor(actor_id: str) -> Optional[Dict[str, Any]]:
    """The actor of this id (hex), or None."""
    return next((row for row in list_actors() if row["actor_id"] == actor_id), None)


def list_nodes(filters=None, limit: int = 10_000, detail: bool = False, **_ray_options: Any) -> List[Dict[str, Any]]:
    """The cluster's nodes, dead ones too: `node_id`, `state`, resources, GPUs, price."""
    return _filtered("nodes", _listing("nodes"), filters, limit)


def list_jobs(filters=None, limit: int = 10_000, detail: bool = False, **_ray_options: Any) -> List[Dict[str, Any]]:
    """This account's jobs: `job_id`, `type` (DRIVER or SUBMISSION), `status`, who pays,
    `start_time`, `end_time`, `min_reliability` (0: any node)."""
    return _filtered("jobs", _listing("jobs"), filters, limit)


def list_placement_groups(filters=None, limit: int = 10_000, detail: bool = False, **_ray_options: Any) -> List[Dict[str, Any]]:
    """This account's placement groups: `placement_group_id`, `name`, `creator_job_id`,
    `state`, `strategy`, `bundles` (each with `node_id` and `unit_resources`),
    `pending_reason`."""
    return _filtered("placement groups", _listing("placement_groups"), filters, limit)


def list_objects(filters=None, limit: int = 10_000, detail: bool = False, **_ray_options: Any) -> List[Dict[str, Any]]:
    """This job's objects, one row per holder, largest first (asked now of every node and
    the driver; an account's key or the operator's credential, through `ionet list
    objects`, sees its account's or all, with the stores' copies nobody holds): `object_id`, `object_size`, `reference_type` (why it is alive), `type`
    (DRIVER, WORKER, or STORE for a stored copy no process that answered holds), `pid`,
    `ip`, `node_id`, `job_id`, `task_status`, `store_node_ids`, `spilled`."""
    return _filtered("objects", _listing("objects"), filters, limit)


def summarize_objects(**_ray_options: Any) -> Dict[str, Any]:
    """Objects counted by why they are alive, with their bytes."""
    summary: Dict[str, Dict[str, Any]] = {}
    rows = list_objects()
    for row in rows:
        entry = summary.setdefault(row["reference_type"], {"reference_type": row["reference_type"], "count": 0, "total_size": 0})
        entry["count"] += 1
        entry["total_size"] += row["object_size"]
    distinct = {row["object_id"] for row in rows}
    return {"cluster": {"summary": summary, "total_objects": len(distinct), "total_size_bytes": sum({row["object_id"]: row["object_size"] for row in rows}.values())}}


def summarize_actors(**_ray_options: Any) -> Dict[str, Any]:
    """Actors counted by class and state, in Ray's shape."""
    summary: Dict[str, Dict[str, Any]] = {}
    rows = list_actors()
    for row in rows:
        entry = summary.setdefault(row["class_name"], {"class_name": row["class_name"], "state_counts": {}})
        entry["state_counts"][row["state"]] = entry["state_counts"].get(row["state"], 0) + 1
    return {"cluster": {"summary": summary, "total_actors": len(rows)}}


def list_tasks(
    filters: Optional[Sequence[Tuple[str, str, Any]]] = None,
    limit: int = 10_000,
    detail: bool = False,
    **_ray_options: Any,
) -> List[Dict[str, Any]]:
    """Tasks matching `filters` (Ray's `(key, "=" or "!=", value)` triples), oldest first,
    at most `limit`. `detail` and Ray's other options are accepted; every field is given."""
    _core.ensure_initialized()
    asked: Dict[str, Any] = {}
    local = []
    for key, predicate, value in filters or []:
        if predicate not in ("=", "!="):
            raise ValueError(f"filter predicate {predicate!r} is not supported: use '=' or '!='")
        if predicate == "=" and key in _HEAD_FILTERS and _HEAD_FILTERS[key] not in asked:
            asked[_HEAD_FILTERS[key]] = str(value)
        else:
            local.append((key, predicate, value))
    # Filtered here too: the head's limit is only safe when nothing is left to filter here.
    rows = json.loads(_ionet.list_tasks(limit=0 if local else int(limit), **asked))
    return _filtered("tasks", rows, local, limit)


def get_task(task_id: str) -> Optional[Dict[str, Any]]:
    """The task of this id (hex), or None."""
    return next((row for row in list_tasks() if row["task_id"] == task_id), None)


def summarize_tasks(**_ray_options: Any) -> Dict[str, Any]:
    """Tasks counted by name and state, in Ray's shape:
    `{"cluster": {"summary": {name: {"state_counts": {...}, "type": ...}}, "total_tasks": N}}`."""
    summary: Dict[str, Dict[str, Any]] = {}
    rows = list_tasks()
    for row in rows:
        entry = summary.setdefault(row["name"], {"func_or_class_name": row["name"], "type": row["type"], "state_counts": {}})
        entry["state_counts"][row["state"]] = entry["state_counts"].get(row["state"], 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": len(rows)}}
