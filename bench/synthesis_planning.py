"""Planning a resumed synthesis against S3: seconds and S3 requests to find the rows still to do.

A local S3 server (moto, in this process) holds an output prefix where half the rows of a mask CSV are
finished (a volume and a record each, as `voldit synthesize` leaves them). Timed: voldit's planning
(read the CSV, list `records/` and `volumes/`), and the planner voldit had before (every record
downloaded, then one existence check per row). Every HTTP request to the server is counted.

    python bench/synthesis_planning.py --rows 100000            # both planners
    python bench/synthesis_planning.py --rows 100000 --skip-previous
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "voldit-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counter:
    """Counts the HTTP requests the S3 server answers (a WSGI middleware around moto's app)."""

    def __init__(self, app) -> None:
        self.app, self.count = app, 0

    def __call__(self, environ, start_response):
        self.count += 1
        return self.app(environ, start_response)


def start_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    counter = Counter(server._server.app)
    server._server.app = counter
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server, counter


def fill(rows: int, done: int, folder: Path) -> tuple[Path, str]:
    """A mask CSV of ``rows`` rows and an S3 output where the first ``done`` rows are finished; the
    objects go straight into the server's store (seeding is not what is measured)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from voldit.synthesis import safe_name

    csv = folder / "masks.csv"
    ids = [f"case_{i:06d}" for i in range(rows)]
    csv.write_text("id,mask\n" + "".join(f"{i},/data/masks/{i}.nii.gz\n" for i in ids))
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    output = f"s3://{BUCKET}/synthetic"
    for row_id in ids[:done]:
        name = safe_name(row_id)
        record = {"id": row_id, "name": name, "status": "ok", "output": f"{output}/volumes/{name}.nii.gz"}
        backend.put_object(BUCKET, f"synthetic/volumes/{name}.nii.gz", b"\x1f\x8b volume")
        backend.put_object(BUCKET, f"synthetic/records/{name}.json", json.dumps(record).encode())
    return csv, output


def plan(csv: Path, output: str) -> int:
    """voldit's planning of a resumed run: the rows still to do."""
    from voldit.synthesis import Layout, plan_rows

    frame = plan_rows(csv, ["mask"])
    done = Layout.of(output).done(frame["name"])
    return int((~frame["name"].isin(done)).sum())


def plan_previous(csv: Path, output: str) -> int:
    """The planner before: every record pulled into staging, then one existence check per record."""
    from voldit import storage
    from voldit.synthesis import plan_rows, safe_name

    frame = plan_rows(csv, ["mask"])
    fs, inner = storage.filesystem(f"{output}/records")
    with tempfile.TemporaryDirectory() as staging:
        for path in fs.glob(f"{inner}/*.json"):
            fs.get_file(path, str(Path(staging) / Path(path).name))
        done = set()
        for name in frame["id"].map(safe_name):
            local = Path(staging) / f"{name}.json"
            if local.is_file():
                record = json.loads(local.read_text())
                if record["status"] == "ok" and storage.exists(record["output"]):
                    done.add(name)
    return int((~frame["id"].map(safe_name).isin(done)).sum())


def measure(label: str, fn, counter: Counter, *args) -> dict:
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()  # no listing cached from the run before
    before, start = counter.count, time.perf_counter()
    todo = fn(*args)
    row = {"planner": label, "seconds": time.perf_counter() - start, "requests": counter.count - before}
    row["rows_to_do"] = todo
    print(f"{label:<42} {row['seconds']:>9.1f} s {row['requests']:>9,} S3 requests   {todo:,} rows to do")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--done", type=float, default=0.5, help="fraction of rows already finished")
    parser.add_argument("--skip-previous", action="store_true", help="time only voldit's planner")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    import voldit.synthesis  # noqa: F401 - imported before the clock starts

    server, counter = start_server()
    try:
        with tempfile.TemporaryDirectory() as folder:
            done = int(args.rows * args.done)
            csv, output = fill(args.rows, done, Path(folder))
            print(f"{args.rows:,} rows, {done:,} finished, output {output} on a local S3 server (moto)")
            rows = [measure("voldit: one listing per folder", plan, counter, csv, output)]
            if not args.skip_previous:
                rows.append(
                    measure("before: a request per record and per row", plan_previous, counter, csv, output)
                )
            assert len({r["rows_to_do"] for r in rows}) == 1, "the planners disagree"
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"rows": args.rows, "done": done, "results": rows}, indent=2)
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
