"""Typed server settings from flags and ``LOSSD_*`` environment variables.

Each setting is one field below: its flag is ``--name-with-dashes`` (or the ``flag`` it
names), its variable ``LOSSD_NAME``; a flag beats the variable, the variable beats the
default. A tuple setting is a repeatable flag and a comma-separated variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None,
             secret: bool = False, flag: str | None = None, metavar: str | None = None
             ) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "secret": secret, "flag": flag,
                                            "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "address the gRPC server binds (0.0.0.0 or [::] for all)")
    port: int = _setting(50051, "gRPC port (0 picks a free port)")
    metrics_host: str = _setting("", "address of the Prometheus /metrics endpoint "
                                     "(empty: same as --host)")
    metrics_port: int = _setting(9464, "port of the Prometheus /metrics endpoint "
                                       "(0 picks a free port, -1 turns it off)")
    device: str = _setting("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:<i>, or "
                                   "a list cuda:0,cuda:1,... that worker processes spread "
                                   "over (with --processes > 1 and several GPUs, cuda and "
                                   "auto spread over every visible GPU)")
    processes: str = _setting("auto", "serving processes on the one port (SO_REUSEPORT) under "
                                      "a supervising parent that restarts any that dies; 1 "
                                      "serves in this process; auto: the CPU cores available "
                                      "on a CPU host, 4 per GPU on a GPU host")
    torch_threads: int = _setting(0, "torch intra-op threads per serving process (0: the CPU "
                                     "cores available divided among the processes, at "
                                     "least 1)")
    max_message_mb: float = _setting(64.0, "largest request message accepted, in MiB; larger "
                                           "ones get RESOURCE_EXHAUSTED (the client splits "
                                           "batches to fit)")
    front: str = _setting("auto", "what carries gRPC calls: native (gRPC C++, built once on "
                                  "first use: needs g++, pkg-config and libgrpc++-dev), "
                                  "grpcio (Python's gRPC server), or auto (native where it "
                                  "builds, else grpcio)", choices=("auto", "native", "grpcio"))
    yield_io_threads: bool = _setting(True, "native front, on Linux: the threads carrying "
                                            "calls to and from Python (gRPC C++'s and the "
                                            "front's) run at SCHED_BATCH, so they never "
                                            "preempt the thread running the handlers: fewer "
                                            "context switches a call on a busy host")
    workers: int = _setting(8, "threads serving calls concurrently (raised to --concurrency + "
                               "--max-waiting + --max-streams + --max-receiving + 2 when "
                               "lower, so waiting evaluations, open streams and unsent "
                               "requests never starve health checks)")
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
    max_tag_length: int = _setting(64, "longest tag kept in loss metrics; a longer one, or one "
                                       "with a character outside letters, digits and "
                                       "_.:/@+=-, counts as 'invalid'")
    # Security (docs/security.md). Settings hold file paths and variable names, never secrets.
    tls_cert: str = _setting("", "PEM certificate chain of the server; with --tls-key turns "
                                 "TLS on")
    tls_key: str = _setting("", "PEM private key of --tls-cert", secret=True)
    tls_client_ca: str = _setting("", "PEM CA bundle; turns on mutual TLS: every client must "
                                      "present a certificate signed by it")
    auth_tokens_file: str = _setting("", "file of accepted bearer tokens, one per line (# "
                                         "comments); re-read when it changes, so tokens rotate "
                                         "without a restart", secret=True)
    auth_tokens_env: str = _setting("LOSSD_AUTH_TOKENS", "name of an environment variable "
                                    "holding accepted bearer tokens, comma-separated; with "
                                    "any token configured every call but grpc.health.v1 needs "
                                    "'authorization: Bearer <token>'")
    health_port: int = _setting(-1, "extra plaintext port serving only grpc.health.v1, for "
                                    "probes that speak neither TLS nor tokens (0 picks a free "
                                    "port, -1 turns it off)")
    malloc_reuse: bool = _setting(True, "keep freed memory in the process (glibc: no mmap for "
                                        "large blocks, no trimming, one arena) so each large "
                                        "request reuses pages instead of faulting in fresh "
                                        "ones; RSS then stays at its peak")
    # Dynamic batching (docs/performance.md, "Knobs").
    batching: str = _setting("off", "coalesce concurrent small requests with the same loss, "
                                    "options and shapes into one device call (off by default: "
                                    "it measured no faster on CPU or an H100, where Python "
                                    "gRPC, not the device, bounds small calls)",
                             choices=("on", "off"))
    batch_max_samples: int = _setting(4096, "most samples in one coalesced device call; larger "
                                            "requests run alone")
    batch_delay_us: int = _setting(500, "how long the first request of a batch waits for "
                                        "others (only while other calls are in flight)")
    # Limits and backpressure (docs/resilience.md, "Limits and backpressure").
    max_elements: int = _setting(1 << 25, "most tensor elements in one request message "
                                          "(predictions, targets, weights and tensor options "
                                          "together), its loss's working memory included "
                                          "(ctc_loss: N x T x (2S+1)); more gets "
                                          "RESOURCE_EXHAUSTED (0: no limit)")
    max_map_entries: int = _setting(64, "most entries in a request's inputs or options map; "
                                        "the entry past it is refused (RESOURCE_EXHAUSTED) "
                                        "as the message is parsed (0: no limit)")
    max_waiting: int = _setting(16, "evaluations that may wait for one of the --concurrency "
                                    "slots; beyond it calls get RESOURCE_EXHAUSTED with a "
                                    "'retry-after-ms' trailer")
    max_streams: int = _setting(0, "streams (EvaluateStream, SharedMemorySession) open at once; "
                                   "a stream is admitted or refused (RESOURCE_EXHAUSTED, "
                                   "'retry-after-ms') when it starts, and its batches then wait "
                                   "for a compute slot, never refused for contention (0: "
                                   "--workers - --concurrency - --max-waiting - "
                                   "--max-receiving - 2, at least 32)")
    max_receiving: int = _setting(32, "unary calls that may wait at once for their request "
                                      "message (each holds a thread); one more ends the "
                                      "longest wait of the caller holding most with "
                                      "RESOURCE_EXHAUSTED")
    message_timeout_seconds: float = _setting(30.0, "how long a unary call's request message "
                                                    "may take to arrive; then the call ends "
                                                    "UNAVAILABLE")
    stream_idle_seconds: float = _setting(10.0, "a stream that sent no message for this long "
                                                "gives its admission up (ends UNAVAILABLE) "
                                                "when --max-streams are open and another "
                                                "stream arrives; with room left it stays "
                                                "open")
    max_rpcs: int = _setting(0, "calls in progress at once, including calls waiting for a "
                                "worker thread; beyond it gRPC answers RESOURCE_EXHAUSTED at "
                                "once (0: twice the worker threads)")
    cuda_memory_fraction: float = _setting(0.0, "cap of the CUDA caching allocator, as a "
                                                "fraction of device memory, for each serving "
                                                "process (0: no cap; with 4 processes on a "
                                                "GPU at most ~0.2 each); evaluations beyond "
                                                "it get RESOURCE_EXHAUSTED")
    # Shared memory (docs/client.md and docs/security.md, "Shared memory").
    shared_memory: bool = _setting(True, "serve SharedMemorySession: co-located callers pass "
                                         "sealed memfds over a Unix-domain socket in "
                                         "--shm-socket-dir")
    shm_socket_dir: str = _setting("", "directory of each server process's descriptor socket "
                                       "(in Kubernetes an emptyDir shared with the caller's "
                                       "container; empty: the temp directory)")
    shm_max_mb: float = _setting(4096.0, "most shared memory one server process maps, in MiB, "
                                         "over all sessions (pages it touches are charged to "
                                         "it)")
    keepalive_seconds: float = _setting(60.0, "interval of the server's HTTP/2 keepalive pings "
                                              "(a dead client's calls are cancelled)")
    min_client_ping_seconds: float = _setting(10.0, "shortest keepalive ping interval "
                                                    "accepted from clients (lossd clients ping "
                                                    "every 30 s); faster pingers are "
                                                    "disconnected")
    # Plugins (docs/plugins.md).
    plugins: tuple[str, ...] = _setting((), "a module (or module:function) whose import "
                                            "registers losses with lossd_server.plugins."
                                            "register; repeatable (the variable: comma-"
                                            "separated); a plugin that fails to load stops "
                                            "the server", flag="--plugin", metavar="MODULE")
    entry_points: bool = _setting(True, "load the plugins installed packages declare in "
                                        "entry-point group lossd.losses")
    max_connection_age_seconds: float = _setting(300.0, "connections are closed (GOAWAY, "
                                                        "in-flight calls finish) after about "
                                                        "this long, so clients re-resolve DNS "
                                                        "and spread over new replicas (0: "
                                                        "never)")
    # Stuck work (docs/limits.md).
    stall_seconds: float = _setting(8.0, "a compute slot held this long is stuck work: "
                                          "health turns NOT_SERVING (a worker process is "
                                          "replaced) and lossd_compute_stalls_total counts "
                                          "it (0: no watchdog)")
    heartbeat_seconds: float = _setting(10.0, "a worker process whose heartbeat is this "
                                              "late is frozen: lossd_worker_up 0, killed and "
                                              "restarted (with --processes > 1; 0: not "
                                              "watched)")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    @property
    def resolved_metrics_host(self) -> str:
        return self.metrics_host or self.host

    @property
    def stream_limit(self) -> int:
        """--max-streams, or its default: what --workers leaves, at least 32."""
        return self.max_streams or max(32, self.workers - self.concurrency - self.max_waiting
                                       - self.max_receiving - 2)

    @property
    def threads(self) -> int:
        """Threads of the call pool: --workers, or enough for every admitted evaluation,
        stream and unsent request with two to spare (health checks, ListLosses)."""
        return max(self.workers, self.concurrency + self.max_waiting + self.stream_limit
                   + self.max_receiving + 2)

    @property
    def shm_max_bytes(self) -> int:
        return int(self.shm_max_mb * 1024 * 1024)

    @property
    def rpc_limit(self) -> int:
        return self.max_rpcs or 2 * self.threads

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)

    def loggable(self) -> dict[str, Any]:
        """The settings as a dict for logs: fields marked secret show only whether set."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "<redacted>"
        return out

    def check(self) -> None:
        """Raise ValueError (naming the flag) for inconsistent settings."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for name in ("concurrency", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        for name in ("max_waiting", "max_elements", "max_rpcs", "max_streams",
                     "max_map_entries", "max_tag_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_receiving < 1:
            raise ValueError("--max-receiving must be at least 1")
        for name in ("message_timeout_seconds", "stream_idle_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.shm_max_mb <= 0:
            raise ValueError("--shm-max-mb must be positive")
        for name in ("stall_seconds", "heartbeat_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if not 0.0 <= self.cuda_memory_fraction <= 1.0:
            raise ValueError("--cuda-memory-fraction must be within [0, 1]")
        if self.processes != "auto" and not (self.processes.isdigit()
                                             and int(self.processes) >= 1):
            raise ValueError(f"--processes: {self.processes!r} is not auto or a number >= 1")
        if self.torch_threads < 0:
            raise ValueError("--torch-threads must not be negative")

    def to_env(self) -> dict[str, str]:
        """Every setting as its ``LOSSD_*`` variable: how worker processes get them."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):  # read back comma-separated
                text = ",".join(value)
            else:
                text = str(value)
            out[self.env_name(f.name)] = text
        return out

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
    kind: Any = type(f.default)
    if kind is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
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


HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "network": ("host", "port", "metrics_host", "metrics_port", "health_port", "reflection",
                "keepalive_seconds", "min_client_ping_seconds",
                "max_connection_age_seconds", "shared_memory", "shm_socket_dir"),
    "processes": ("processes", "torch_threads", "front", "yield_io_threads", "workers",
                  "concurrency", "grace_seconds", "malloc_reuse"),
    "limits": ("max_message_mb", "max_elements", "max_waiting", "max_streams", "max_rpcs",
               "max_receiving", "message_timeout_seconds", "stream_idle_seconds",
               "max_map_entries", "shm_max_mb", "stall_seconds", "heartbeat_seconds"),
    "security": ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file",
                 "auth_tokens_env"),
    "device": ("device", "cuda_memory_fraction", "batching", "batch_max_samples",
               "batch_delay_us"),
    "observability": ("log_level", "log_format", "loss_buckets", "tags", "max_tags",
                      "max_tag_length"),
    "plugins": ("plugins", "entry_points"),
}
"""The sections of ``lossd serve --help``, each setting in one (tests check that every
setting is in exactly one); a setting left out lands in a last "other" section."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in the sections of ``HELP_GROUPS``; the default each help
    shows is the built-in one, which a ``LOSSD_*`` variable overrides. The usage line
    says ``[options]``: forty flags spelled out there would repeat the sections."""
    parser.usage = "%(prog)s [options]"
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    grouped = {name for names in HELP_GROUPS.values() for name in names}
    sections = [*HELP_GROUPS.items(),
                ("other", tuple(name for name in fields if name not in grouped))]
    for title, names in sections:
        if names:
            group = parser.add_argument_group(title)
            for name in names:
                _add_argument(group, fields[name])


def _add_argument(group: argparse._ArgumentGroup, f: dataclasses.Field[Any]) -> None:
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    env = Settings.env_name(f.name)
    help_text = f"{f.metadata['help']} [env {env}; default: {f.default!r}]"
    if isinstance(f.default, tuple):
        group.add_argument(flag, dest=f.name, action="append", default=None,
                           metavar=f.metadata.get("metavar"), help=help_text)
    elif isinstance(f.default, bool):
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
    else:
        group.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                           choices=f.metadata.get("choices"), help=help_text)


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    given = {f.name: (tuple(value) if isinstance(f.default, tuple) else value)
             for f in dataclasses.fields(Settings)
             if (value := getattr(args, f.name, None)) is not None}
    return Settings.from_env(env, **given)
