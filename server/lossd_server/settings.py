"""Typed server settings from flags and ``LOSSD_*`` environment variables.

Each setting is one field below: its flag is ``--name-with-dashes``, its variable
``LOSSD_NAME``; a flag beats the variable, the variable beats the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "address the gRPC server binds (0.0.0.0 or [::] for all)")
    port: int = _setting(50051, "gRPC port (0 picks a free port)")
    metrics_host: str = _setting("", "address of the Prometheus /metrics endpoint "
                                     "(empty: same as --host)")
    metrics_port: int = _setting(9464, "port of the Prometheus /metrics endpoint "
                                       "(0 picks a free port, -1 turns it off)")
    device: str = _setting("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:<i>")
    max_message_mb: float = _setting(64.0, "largest request message accepted, in MiB; larger "
                                           "ones get RESOURCE_EXHAUSTED (the client splits "
                                           "batches to fit)")
    workers: int = _setting(8, "threads serving calls concurrently")
    concurrency: int = _setting(2, "evaluations running on the device at once; further calls "
                                   "wait (the 'queue' stage)")
    grace_seconds: float = _setting(10.0, "on SIGTERM/SIGINT, how long in-flight calls may "
                                          "finish before the server exits")
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting("text", "log line format", choices=("text", "json"))
    reflection: bool = _setting(True, "serve gRPC server reflection")
    loss_buckets: str = _setting("0.001,0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2,4,8,16",
                                 "bucket bounds of the lossd_sample_loss histogram")
    tags: str = _setting("", "comma-separated allow-list of request tags for loss metrics "
                             "(others count as 'other'); empty: the first --max-tags seen")
    max_tags: int = _setting(32, "distinct tags kept in loss metrics when no allow-list is set")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    @property
    def resolved_metrics_host(self) -> str:
        return self.metrics_host or self.host

    @classmethod
    def env_name(cls, name: str) -> str:
        return f"LOSSD_{name.upper()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``LOSSD_*`` variables, then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(cls.env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, source=cls.env_name(f.name))
        values.update(overrides)
        return cls(**values)


def _parse(f: dataclasses.Field[Any], raw: str, *, source: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            value: Any = low in ("1", "true", "yes", "on")
        else:
            value = kind(raw)
    except ValueError:
        raise SystemExit(f"{source}: cannot read {raw!r} as {kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise SystemExit(f"{source}: {raw!r} is not one of {', '.join(choices)}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults shown are the environment-resolved ones."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = Settings.env_name(f.name)
        help_text = f"{f.metadata['help']} [env {env}; default: {f.default!r}]"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                                choices=f.metadata.get("choices"), help=help_text)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
             if getattr(args, f.name, None) is not None}
    return Settings.from_env(env, **given)
