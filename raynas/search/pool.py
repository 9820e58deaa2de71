"""A pool of evaluator actors that survives actor death: dead actors are replaced, work retried."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError


class EvaluationFailed(RuntimeError):
    pass


class ActorPool:
    """Runs `actor.<method>(item)` over items on `num_actors` actors, yielding results as they finish.

    Unlike `ray.util.ActorPool`, a dead actor is never reused: it is replaced by a fresh one from
    `make_actor` and the item it held is resubmitted (up to `max_attempts` times in all).
    """

    def __init__(self, make_actor: Callable[[], Any], num_actors: int, method: str = "evaluate",
                 max_attempts: int = 3):
        if num_actors < 1:
            raise ValueError("num_actors must be >= 1")
        self.make_actor, self.method, self.max_attempts = make_actor, method, max_attempts
        self.actors = [make_actor() for _ in range(num_actors)]
        self.replaced = 0

    def _replace(self, dead) -> Any:
        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # already gone
            pass
        self.actors.remove(dead)
        fresh = self.make_actor()
        self.actors.append(fresh)
        self.replaced += 1
        return fresh

    def map_unordered(self, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        queue: deque[tuple[Any, int]] = deque((item, 1) for item in items)
        idle = deque(self.actors)
        in_flight: dict[ray.ObjectRef, tuple[Any, Any, int]] = {}
        while queue or in_flight:
            while queue and idle:
                item, attempt = queue.popleft()
                actor = idle.popleft()
                ref = getattr(actor, self.method).remote(item)
                in_flight[ref] = (actor, item, attempt)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, item, attempt = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                if attempt >= self.max_attempts:
                    raise EvaluationFailed(f"{item!r} failed {attempt} times; last error: {exc}") from None
                idle.append(self._replace(actor))
                queue.appendleft((item, attempt + 1))
                continue
            idle.append(actor)
            yield item, result

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
