"""A small discrete-event timeline: tasks on resources, with dependencies, static orders and fillers.

A *resource* is one GPU or a group of GPUs that always work together (a tensor-parallel group); it runs one task
at a time, without preemption. Each resource has a *static order* (its pipeline schedule: 1F1B's forwards and
backwards in megatron's order) and a pool of *fillers* (ViT chunks), which it may run whenever the next task of
its static order is not ready: the lowest `priority` of the ready fillers first; a filler whose `deadline` is
near (deadline - duration <= now) goes before the static order's next task. A task with `resource=None`
occupies nothing: a transfer or a collective, which only delays what depends on it.

A task starts at the earliest time when its resource is free and every dependency has finished (plus the
dependency's `delay`). Events are processed in time order, so a filler that starts before a static task becomes
ready delays that task (the resource does not know the future), as a real rank would.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Task:
    key: tuple
    resource: object | None  # None: a transfer / collective that occupies no resource
    duration: float
    deps: list = field(default_factory=list)  # [(key, delay_s)]: start >= that task's end + delay
    filler: bool = False
    priority: tuple = ()
    kind: str = ""
    deadline: float = float("inf")  # a filler this close to its deadline (deadline - duration <= now) goes first
    start: float = float("nan")
    end: float = float("nan")


@dataclass
class Timeline:
    tasks: dict
    makespan: float
    busy: dict  # resource -> seconds busy
    finish: dict  # resource -> time its last task ended

    def utilization(self, resource) -> float:
        return self.busy.get(resource, 0.0) / self.makespan if self.makespan > 0 else 0.0

    def by_kind(self, resource) -> dict:
        out: dict = {}
        for t in self.tasks.values():
            if t.resource == resource:
                out[t.kind] = out.get(t.kind, 0.0) + t.duration
        return out


def _deps(task: Task) -> list[tuple]:
    return [(key, float(delay)) for key, delay in task.deps]


def run(tasks: list[Task], orders: dict) -> Timeline:
    """Simulate: `orders[resource]` is that resource's static order (task keys); every other task on a resource
    must be a filler. Raises ValueError on a cycle or a task that can never start."""
    by_key = {t.key: t for t in tasks}
    if len(by_key) != len(tasks):
        raise ValueError("duplicate task keys")
    deps = {t.key: _deps(t) for t in tasks}
    for key, ds in deps.items():
        for d, _ in ds:
            if d not in by_key:
                raise ValueError(f"task {key} depends on unknown task {d}")
    waiting = {k: len(ds) for k, ds in deps.items()}
    dependants: dict = {}
    for k, ds in deps.items():
        for d, delay in ds:
            dependants.setdefault(d, []).append((k, delay))
    ready_at = {k: 0.0 for k in by_key}
    static_pos = {r: 0 for r in orders}
    in_order = {k for order in orders.values() for k in order}
    for t in tasks:
        if t.resource is not None and not t.filler and t.key not in in_order:
            raise ValueError(f"task {t.key} is on resource {t.resource} but in no static order and not a filler")
    fillers: dict = {}  # resource -> heap of (priority, seq, key) of fillers whose deps are all done
    resources = set(orders) | {t.resource for t in tasks if t.resource is not None}
    free_at = {r: 0.0 for r in resources}
    running = {r: None for r in resources}
    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(time: float, kind: str, payload) -> None:
        nonlocal seq
        heapq.heappush(events, (time, seq, kind, payload))
        seq += 1

    def deps_done(key) -> None:
        t = by_key[key]
        if t.resource is None:
            push(ready_at[key], "start_free", key)
        elif t.filler:
            if ready_at[key] > now:
                push(ready_at[key], "filler_ready", key)
            else:
                heapq.heappush(fillers.setdefault(t.resource, []), (t.priority, key_seq[key], key))
                dispatch(t.resource)
        else:
            if ready_at[key] > now:
                push(ready_at[key], "wake", t.resource)
            else:
                dispatch(t.resource)

    def start(key, resource, at: float) -> None:
        t = by_key[key]
        t.start, t.end = at, at + t.duration
        running[resource] = key
        free_at[resource] = t.end
        push(t.end, "finish", key)

    def dispatch(resource) -> None:
        if starting or running.get(resource) is not None:
            return
        order = orders.get(resource, [])
        pos = static_pos.get(resource, 0)
        heap = fillers.get(resource)
        if heap:
            urgent = by_key[heap[0][2]]
            if urgent.deadline - urgent.duration <= now:
                heapq.heappop(heap)
                start(urgent.key, resource, now)
                return
        if pos < len(order):
            key = order[pos]
            if waiting[key] == 0 and ready_at[key] <= now:
                static_pos[resource] = pos + 1
                start(key, resource, now)
                return
        heap = fillers.get(resource)
        if heap:
            _, _, key = heapq.heappop(heap)
            start(key, resource, now)

    key_seq = {t.key: i for i, t in enumerate(tasks)}
    now = 0.0
    starting = True  # queue every task ready at 0 before any resource picks, so priorities hold from the start
    for t in tasks:
        if waiting[t.key] == 0:
            deps_done(t.key)
    starting = False
    for r in sorted(resources, key=repr):
        dispatch(r)
    done = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "finish":
            t = by_key[payload]
            done += 1
            if t.resource is not None:
                running[t.resource] = None
            for k, delay in dependants.get(payload, []):
                ready_at[k] = max(ready_at[k], t.end + delay)
                waiting[k] -= 1
                if waiting[k] == 0:
                    deps_done(k)
            if t.resource is not None:
                dispatch(t.resource)
        elif kind == "start_free":
            t = by_key[payload]
            t.start, t.end = now, now + t.duration
            push(t.end, "finish", payload)
        elif kind == "filler_ready":
            t = by_key[payload]
            heapq.heappush(fillers.setdefault(t.resource, []), (t.priority, key_seq[payload], payload))
            dispatch(t.resource)
        elif kind == "wake":
            dispatch(payload)
    if done != len(tasks):
        stuck = [k for k, t in by_key.items() if t.end != t.end][:5]
        raise ValueError(f"{len(tasks) - done} tasks never ran (a cycle or a static order against its deps): {stuck}")
    makespan = max((t.end for t in tasks), default=0.0)
    busy: dict = {}
    finish: dict = {}
    for t in tasks:
        if t.resource is not None:
            busy[t.resource] = busy.get(t.resource, 0.0) + t.duration
            finish[t.resource] = max(finish.get(t.resource, 0.0), t.end)
    return Timeline(by_key, makespan, busy, finish)
