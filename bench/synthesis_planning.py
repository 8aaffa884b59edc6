"""Planning a resumed synthesis against S3: seconds and S3 requests to find the rows still to do.

A local S3 server (moto, in this process) holds an output prefix where half the rows of a mask CSV are
finished, as a killed `voldit synthesize` leaves them: a volume, a preview and a record per row, and the
driver's journal (parts of 1,000 records) for all but the last ``--unjournaled`` rows (finished after the
journal's last part when the driver was killed). Timed: voldit's planning (read the CSV, open the
journal: one listing, a request per part, the parts merged into one), and the check its actors make for
the rows the journal lacks (a request per row, during the run, in batches of 4). For comparison, the two
planners voldit had before: one listing of `records/` and one of `volumes/`, and earlier every record
downloaded then one existence check per row. Every HTTP request to the server is counted.

    python bench/synthesis_planning.py --rows 100000 --skip-previous   # journal and the listing planner
    python bench/synthesis_planning.py --rows 10000                    # all three
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


def fill(rows: int, done: int, unjournaled: int, folder: Path) -> tuple[Path, str]:
    """A mask CSV of ``rows`` rows and an S3 output where the first ``done`` rows are finished and all
    but the last ``unjournaled`` of them are in the journal. The per-row objects go straight into the
    server's store; the journal is written by voldit's own `Journal` (seeding is not what is measured)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from voldit.synthesis import Journal, Layout, safe_name

    csv = folder / "masks.csv"
    ids = [f"case_{i:06d}" for i in range(rows)]
    csv.write_text("id,mask\n" + "".join(f"{i},/data/masks/{i}.nii.gz\n" for i in ids))
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    output = f"s3://{BUCKET}/synthetic"
    journal = Journal(Layout.of(output), {}, [])
    for k, row_id in enumerate(ids[:done]):
        name = safe_name(row_id)
        record = {
            "id": row_id,
            "name": name,
            "masks": {"mask": f"/data/masks/{row_id}.nii.gz"},
            "output": f"{output}/volumes/{name}.nii.gz",
            "preview": f"{output}/previews/{name}.png",
            "seed": k,
            "sampler": "ddpm",
            "steps": 300,
            "eta": 0.0,
            "guidance": 1.0,
            "checkpoint_id": "0" * 16,
            "vqgan_id": "1" * 16,
            "status": "ok",
            "error": "",
            "seconds": 6.1,
            "shape": [512, 512, 256],
        }
        backend.put_object(BUCKET, f"synthetic/volumes/{name}.nii.gz", b"\x1f\x8b volume")
        backend.put_object(BUCKET, f"synthetic/previews/{name}.png", b"\x89PNG preview")
        backend.put_object(BUCKET, f"synthetic/records/{name}.json", json.dumps(record).encode())
        if k < done - unjournaled:
            journal.add(record)  # a part every 1,000 records, as the driver writes them
    journal.flush()
    return csv, output


def plan(csv: Path, output: str) -> int:
    """voldit's planning of a resumed run: the rows still to do."""
    from voldit.synthesis import Journal, Layout, plan_rows

    frame = plan_rows(csv, ["mask"])
    done = Journal.open(Layout.of(output), frame["name"]).done()
    return int((~frame["name"].isin(done)).sum())


def actor_checks(csv: Path, output: str) -> int:
    """What voldit's actors find already done among the rows the journal lacks (batches of 4); returns
    the rows they would still synthesise."""
    from voldit.synthesis import Journal, Layout, plan_rows

    layout = Layout.of(output)
    frame = plan_rows(csv, ["mask"])
    done = Journal.open(layout, frame["name"]).done()
    todo = frame[~frame["name"].isin(done)].to_dict("records")
    found = 0
    for k in range(0, len(todo), 4):
        found += len(layout.finished(todo[k : k + 4]))
    return len(todo) - found


def plan_listing(csv: Path, output: str) -> int:
    """The planner before the journal: one listing of `records/` and one of `volumes/`."""
    from voldit import storage
    from voldit.synthesis import plan_rows

    frame = plan_rows(csv, ["mask"])
    listed = []
    for folder, suffix in (("records", ".json"), ("volumes", ".nii.gz")):
        fs, inner = storage.filesystem(f"{output}/{folder}")
        listed.append({Path(p).name[: -len(suffix)] for p in fs.find(inner) if p.endswith(suffix)})
    done = set(frame["name"]) & listed[0] & listed[1]
    return int((~frame["name"].isin(done)).sum())


def plan_previous(csv: Path, output: str) -> int:
    """The first planner: every record pulled into staging, then one existence check per record."""
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
    parser.add_argument(
        "--unjournaled", type=int, default=500, help="finished rows the killed driver's journal lacks"
    )
    parser.add_argument(
        "--skip-previous", action="store_true", help="skip the first planner (a request per row)"
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    import voldit.synthesis  # noqa: F401 - imported before the clock starts

    server, counter = start_server()
    try:
        with tempfile.TemporaryDirectory() as folder:
            done = int(args.rows * args.done)
            csv, output = fill(args.rows, done, args.unjournaled, Path(folder))
            print(
                f"{args.rows:,} rows, {done:,} finished ({args.unjournaled:,} of them not in the journal), "
                f"output {output} on a local S3 server (moto)"
            )
            rows = [
                measure("voldit: the journal", plan, counter, csv, output),
                measure("+ the actors' check: a request per row to do", actor_checks, counter, csv, output),
                measure("before: one listing per folder", plan_listing, counter, csv, output),
            ]
            if not args.skip_previous:
                rows.append(
                    measure("first: a request per record and per row", plan_previous, counter, csv, output)
                )
            assert rows[0]["rows_to_do"] == args.rows - done + args.unjournaled, rows[0]
            assert len({r["rows_to_do"] for r in rows[1:]}) == 1, "the planners disagree"
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {"rows": args.rows, "done": done, "unjournaled": args.unjournaled, "results": rows},
                        indent=2,
                    )
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
