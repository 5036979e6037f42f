#!/usr/bin/env python3
"""Example Python client for the mlaserve Coordinator (mlaserve.v1 over gRPC).

Streams the generated token ids to stdout as they arrive, then prints the finish reason,
usage and timings. `--status` prints the coordinator's health and workers instead.

`--address` may list several coordinators (comma-separated). When a stream breaks (its
coordinator died or is stopping: UNAVAILABLE, INTERNAL or UNKNOWN before the final message),
the client resumes it on the next coordinator, sending the tokens already received as
received_ids under the same request_id: the stream goes on with nothing lost or repeated.

Needs grpcio and protobuf (Debian: python3-grpcio, python3-protobuf; run with
/usr/bin/python3 there). The Python stubs are generated from
rpc/proto/mlaserve/v1/mlaserve.proto into a temporary directory when they are not
importable already, with `python -m grpc_tools.protoc` if grpcio-tools is installed, else
with `protoc` and `grpc_python_plugin`. See rpc/python/README.md.
"""

import argparse
import atexit
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROTO_FILE = Path("mlaserve/v1/mlaserve.proto")
DEFAULT_PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
MAX_MESSAGE_BYTES = 64 << 20  # as the C++ client (rpc/client.h)


def generate_stubs(proto_root: Path, out_dir: Path) -> None:
    """Writes mlaserve/v1/mlaserve_pb2.py and mlaserve_pb2_grpc.py under out_dir."""
    proto = proto_root / PROTO_FILE
    if not proto.is_file():
        raise SystemExit(f"error: {proto} not found; pass --proto-root")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import grpc_tools.protoc  # noqa: F401  (only probing that it is installed)

        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_root}",
               f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(proto)]
    except ImportError:
        protoc = shutil.which("protoc")
        plugin = shutil.which("grpc_python_plugin") or "/usr/bin/grpc_python_plugin"
        if protoc is None or not Path(plugin).exists():
            raise SystemExit("error: need grpcio-tools, or protoc and grpc_python_plugin "
                             "(Debian: protobuf-compiler, protobuf-compiler-grpc)")
        cmd = [protoc, f"--proto_path={proto_root}", f"--python_out={out_dir}",
               f"--grpc_out={out_dir}", f"--plugin=protoc-gen-grpc={plugin}", str(proto)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: generating stubs failed: {' '.join(cmd)}\n{result.stderr}")


def load_stubs(proto_root: Path, stubs_dir: "Path | None"):
    """Returns (mlaserve_pb2, mlaserve_pb2_grpc), generating them when needed."""
    if stubs_dir is None:
        try:
            from mlaserve.v1 import mlaserve_pb2, mlaserve_pb2_grpc
            return mlaserve_pb2, mlaserve_pb2_grpc
        except ImportError:
            stubs_dir = Path(tempfile.mkdtemp(prefix="mlaserve_stubs_"))
            atexit.register(shutil.rmtree, stubs_dir, ignore_errors=True)
    if not (stubs_dir / "mlaserve/v1/mlaserve_pb2_grpc.py").is_file():
        generate_stubs(proto_root, stubs_dir)
    sys.path.insert(0, str(stubs_dir))
    importlib.invalidate_caches()
    from mlaserve.v1 import mlaserve_pb2, mlaserve_pb2_grpc
    return mlaserve_pb2, mlaserve_pb2_grpc


def parse_ids(text: str) -> list:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got '{text}'")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="coordinator host:port, or several, comma-separated")
    p.add_argument("--ca-file", type=Path,
                   help="TLS: verify the coordinators against this CA (PEM); default plaintext")
    p.add_argument("--max-resumes", type=int, default=8,
                   help="times a broken stream is resumed on another coordinator")
    p.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="0 or 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", type=parse_ids, default=[], help="e.g. 2,3")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    p.add_argument("--request-id", default="", help="default: the coordinator assigns one")
    p.add_argument("--timeout", type=float, default=0.0, help="deadline in seconds; 0 = none")
    p.add_argument("--status", action="store_true", help="print health and workers, then exit")
    p.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT,
                   help="directory holding mlaserve/v1/mlaserve.proto")
    p.add_argument("--stubs-dir", type=Path,
                   help="where to keep generated stubs (default: a temporary directory)")
    args = p.parse_args(argv)
    if not args.status and not args.prompt_ids:
        p.error("--prompt-ids is required (or pass --status)")
    return args


def print_status(pb2, stub, timeout):
    health = stub.Health(pb2.HealthRequest(), timeout=timeout)
    print(f"serving: {health.serving}  workers alive: {health.workers_alive}")
    workers = stub.ListWorkers(pb2.ListWorkersRequest(), timeout=timeout)
    for w in workers.workers:
        load = w.load
        print(f"  {w.worker_id:<20} {w.address:<21} {w.state:<9} tp={w.model.tp_size} "
              f"pages {load.free_pages}/{load.total_pages} free  running={load.running} "
              f"waiting={load.waiting}  {load.tokens_per_second:.1f} tok/s  "
              f"in flight={w.in_flight}  heartbeat {w.ms_since_heartbeat:.0f} ms ago")
    print(f"requests in flight: {workers.in_flight} (max {workers.max_in_flight})")


RESUMABLE = ("UNAVAILABLE", "INTERNAL", "UNKNOWN")


def generate(pb2, stubs, args) -> int:
    """Streams one request, resuming it on the next coordinator when its stream breaks."""
    import grpc

    request = pb2.GenerateRequest(
        request_id=args.request_id.encode(),
        prompt_ids=args.prompt_ids,
        max_tokens=args.max_tokens,
        sampling=pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed),
        stop_ids=args.stop_ids,
        ignore_eos=args.ignore_eos,
        return_logprobs=args.logprobs,
    )
    start = time.monotonic()
    deadline = start + args.timeout if args.timeout else None
    first_token_s = None
    received = []
    workers = []
    last = None
    index = 0
    backoff = 0.1
    for attempt in range(args.max_resumes + 1):
        address, stub = stubs[index]
        if attempt > 0:
            # Everything received so far, under the id the first coordinator gave it.
            if last is not None:
                request.request_id = last.request_id.encode()
            del request.received_ids[:]
            request.received_ids.extend(received)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        call = stub.Generate(request, timeout=timeout)
        try:
            for msg in call:
                if msg.token_ids and first_token_s is None:
                    first_token_s = time.monotonic() - start
                for i, tok in enumerate(msg.token_ids):
                    if args.logprobs and i < len(msg.logprobs):
                        print(f"{tok}({msg.logprobs[i]:.3f})", end=" ", flush=True)
                    else:
                        print(tok, end=" ", flush=True)
                received.extend(msg.token_ids)
                if msg.worker_id and msg.worker_id not in workers:
                    workers.append(msg.worker_id)
                last = msg
            break
        except KeyboardInterrupt:
            call.cancel()  # the coordinator frees the request's cache pages at once
            print("\ncancelled", file=sys.stderr)
            return 130
        except grpc.RpcError as e:
            finished = last is not None and last.finish_reason != 0
            if (finished or e.code().name not in RESUMABLE or attempt == args.max_resumes
                    or len(received) >= args.max_tokens):
                raise
            index = (index + 1) % len(stubs)
            print(f"\n[stream broke on {address} after {len(received)} tokens "
                  f"({e.code().name}); resuming on {stubs[index][0]}]", file=sys.stderr)
            time.sleep(backoff)
            backoff = min(2 * backoff, 1.0)
    print()
    if last is None:
        print("error: the stream ended without a message", file=sys.stderr)
        return 1
    finish = pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    total_s = time.monotonic() - start
    print(f"request {last.request_id}: finish={finish}  prompt_tokens={last.usage.prompt_tokens}"
          f"  completion_tokens={last.usage.completion_tokens}")
    print(f"server: ttft {last.timings.ttft_ms:.1f} ms, total {last.timings.total_ms:.1f} ms"
          f"  client: ttft {1000 * (first_token_s or 0):.1f} ms, total {1000 * total_s:.1f} ms"
          f"  workers: {', '.join(workers) or '-'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import grpc
        import google.protobuf  # noqa: F401
    except ImportError as e:
        print(f"error: {e}; this client needs grpcio and protobuf (Debian: python3-grpcio "
              f"python3-protobuf, then run it with /usr/bin/python3)", file=sys.stderr)
        return 1
    pb2, pb2_grpc = load_stubs(args.proto_root, args.stubs_dir)

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    addresses = [a for a in args.address.split(",") if a]
    if not addresses:
        print("error: --address names no coordinator", file=sys.stderr)
        return 1
    if args.ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.ca_file.read_bytes())
        channels = [grpc.secure_channel(a, credentials, options=options) for a in addresses]
    else:
        channels = [grpc.insecure_channel(a, options=options) for a in addresses]
    stubs = [(a, pb2_grpc.CoordinatorStub(c)) for a, c in zip(addresses, channels)]
    try:
        if args.status:
            print_status(pb2, stubs[0][1], args.timeout or 10.0)
            return 0
        return generate(pb2, stubs, args)
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        for c in channels:
            c.close()


if __name__ == "__main__":
    sys.exit(main())
