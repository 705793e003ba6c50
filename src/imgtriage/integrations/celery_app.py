"""The imgtriage Celery app, configured for long classification tasks.

Start a worker (the bundle loads once per worker process)::

    IMGTRIAGE_CELERY_BROKER=redis://127.0.0.1:6379/0 IMGTRIAGE_BUNDLE=runs/digits/bundle \\
        celery -A imgtriage.integrations.celery_app worker --pool prefork -c 2

and call a task from anywhere that reaches the broker::

    >>> from imgtriage.integrations.celery_app import app  # doctest: +SKIP
    >>> app.send_task("imgtriage.classify_paths", args=[["/data/inbox"]]).get()  # doctest: +SKIP

In a project that already has a Celery app (Django, say), do not use this app: import
:mod:`imgtriage.integrations.celery_tasks` (its tasks are ``shared_task`` s and join the
project's app) and apply :meth:`CelerySettings.to_celery` there; see docs/scale-out.md.
Needs ``pip install 'imgtriage[celery]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgtriage.errors import ConfigError, require

ENV_PREFIX = "IMGTRIAGE_CELERY_"
TASKS_MODULE = "imgtriage.integrations.celery_tasks"


@dataclass(frozen=True)
class CelerySettings:
    """Broker, results and the settings that make long tasks safe.

    Attributes:
        broker_url: where tasks queue (env ``IMGTRIAGE_CELERY_BROKER``).
        result_backend: where reports go back (env ``IMGTRIAGE_CELERY_BACKEND``; default:
            the broker).
        time_limit: hard limit in seconds: the worker process is killed and replaced.
        soft_time_limit: ``SoftTimeLimitExceeded`` is raised inside the task first, so a
            result store commits what it has (default: time_limit - 60 s, at least 1 s).
        max_tasks_per_child: a prefork child is replaced after this many tasks (bounds
            memory growth of decoders; the bundle reloads once in the new child).
        visibility_timeout: seconds Redis waits for an ack before handing a task to another
            worker; with late acks it must exceed the longest task, or long tasks run twice
            (default: 2 × time_limit).
        result_expires: seconds a report stays in the result backend.

    Example:
        >>> s = CelerySettings(broker_url="redis://127.0.0.1:6390/0", time_limit=600)
        >>> s.to_celery()["task_soft_time_limit"], s.to_celery()["worker_prefetch_multiplier"]
        (540, 1)
    """

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    time_limit: int = 3600
    soft_time_limit: int | None = None
    max_tasks_per_child: int = 50
    visibility_timeout: int | None = None
    result_expires: int = 86400

    def __post_init__(self) -> None:
        for name in ("time_limit", "max_tasks_per_child", "result_expires"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 ({ENV_PREFIX}{name.upper()})")
        soft = self.soft_time_limit
        if soft is not None and not 1 <= soft < self.time_limit:
            raise ConfigError(f"soft_time_limit must be >= 1 and below time_limit "
                              f"({self.time_limit}), got {soft} ({ENV_PREFIX}SOFT_TIME_LIMIT)")
        vis = self.visibility_timeout
        if vis is not None and vis <= self.time_limit:
            raise ConfigError(f"visibility_timeout ({vis}) must exceed time_limit "
                              f"({self.time_limit}), or a long task is handed to a second "
                              f"worker while the first still runs it "
                              f"({ENV_PREFIX}VISIBILITY_TIMEOUT)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CelerySettings:
        """Read ``IMGTRIAGE_CELERY_BROKER``, ``_BACKEND``, ``_TIME_LIMIT``,
        ``_SOFT_TIME_LIMIT``, ``_MAX_TASKS_PER_CHILD``, ``_VISIBILITY_TIMEOUT``,
        ``_RESULT_EXPIRES``; unset ones keep their defaults.

        Example:
            >>> CelerySettings.from_env({"IMGTRIAGE_CELERY_TIME_LIMIT": "120"}).time_limit
            120
        """
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        if env.get(ENV_PREFIX + "BROKER"):
            kw["broker_url"] = env[ENV_PREFIX + "BROKER"]
        if env.get(ENV_PREFIX + "BACKEND"):
            kw["result_backend"] = env[ENV_PREFIX + "BACKEND"]
        for name in ("time_limit", "soft_time_limit", "max_tasks_per_child",
                     "visibility_timeout", "result_expires"):
            raw = env.get(ENV_PREFIX + name.upper())
            if raw:
                try:
                    kw[name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a whole number of "
                                      f"{'tasks' if 'tasks' in name else 'seconds'}, "
                                      f"got {raw!r}") from None
        return cls(**kw)

    def to_celery(self) -> dict[str, Any]:
        """The Celery settings (lower-case names; Django: ``CELERY_`` + upper case)."""
        soft = self.soft_time_limit or max(1, self.time_limit - 60)
        vis = self.visibility_timeout or 2 * self.time_limit
        return {
            "broker_url": self.broker_url,
            "result_backend": self.result_backend or self.broker_url,
            "task_acks_late": True,  # a task whose worker dies is run again, not lost
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,  # a long task never sits behind another
            "worker_max_tasks_per_child": self.max_tasks_per_child,
            "task_time_limit": self.time_limit,
            "task_soft_time_limit": soft,
            "broker_transport_options": {"visibility_timeout": vis},
            "result_backend_transport_options": {"visibility_timeout": vis},
            "result_expires": self.result_expires,
            "task_track_started": True,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "broker_connection_retry_on_startup": True,
        }


def make_app(settings: CelerySettings | None = None, name: str = "imgtriage"):
    """A Celery app with :class:`CelerySettings` and the imgtriage tasks registered.

    Example:
        >>> app = make_app(CelerySettings(broker_url="redis://127.0.0.1:6390/0"))
        >>> app.conf.task_acks_late
        True
    """
    celery = require("celery", "celery")
    settings = settings or CelerySettings.from_env()
    app = celery.Celery(name, include=[TASKS_MODULE])
    app.conf.update(settings.to_celery())
    return app


app = make_app()
