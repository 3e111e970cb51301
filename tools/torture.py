"""Torture test for the stage cache: SIGKILLs inside every stage, concurrent runs sharing one
cache, damaged cache files. Every check compares the exported model, file by file, with that of an
uninterrupted run.

    python tools/torture.py --out outputs/torture --kills 10 --concurrent 2,4
    python tools/torture.py --kills 3 -- --model /path/to/model --dataset data.jsonl --no-card

Arguments after ``--`` go to every run: of ``python -m dtr_core`` (default: ``experiment=quick``'s
settings, MiniLM and BBC News) or, with ``--entry flow``, of the flow (default: ``experiment=quick``;
concurrent flows then share one output folder, MLflow store and cache). Phases:

- reference: one run on an empty cache; its cache journal (``<cache>/computed.log``) lists every
  stage result, and its lock files when each started, so each stage's duration is known.
- kills: kill ``i`` aims at the i-th stage kind in turn (capture, distill, ..., export): a run
  starts on the shared cache and is SIGKILLed (with its process group) at a random moment while it
  holds the lock of a result of that kind not yet in the cache. When every result of the kind is
  done, a run finishes the cycle (its export is checked) and the cache starts empty again. A last
  uninterrupted run must export exactly the reference's files.
- concurrent: N runs started together on an empty cache (the command line's each with its own
  --output-dir): all exit 0, export the reference's files, and the journal holds every result
  exactly once (no stage computed twice).
- damage: three rounds (truncate, flip a bit, edit a manifest's value into another valid one), each
  damaging a manifest and a listed file (shard, weights, probe, exported file) per stage kind, then
  a rerun: it exits 0, warns about each damaged result, computes it again and exports the
  reference's files.

Writes ``<out>/results.json`` and prints a summary; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the dtr_core these runs use, also when another copy is installed

from dtr_core.io import sha256_file  # noqa: E402
from dtr_core.stage_cache import STAGES, StageCache  # noqa: E402

# Each entry point's default arguments: experiment=quick (MiniLM, BBC News, a small budget).
DEFAULT_ARGS = {"cli": ["--max-examples", "120", "--token-budget", "16000"], "flow": ["experiment=quick"]}
DAMAGE_ROUNDS = ("truncate", "bit-flip", "edit")


class Torture:
    def __init__(self, out: Path, entry: str, dtr_args: list[str], rng: random.Random, timeout: float) -> None:
        self.out, self.entry, self.dtr_args, self.rng, self.timeout = out, entry, dtr_args, rng, timeout
        self.runs = 0

    # --- runs ----------------------------------------------------------------------------------

    def start(self, folder: Path, name: str) -> subprocess.Popen:
        """One run on the cache ``folder/cache``, its output in ``folder/name.log``, in its own
        process group (a kill takes every process). The command line's run folder is ``folder/name``;
        the flow's, Hydra's ``folder/runs/<time>_<pid>-<random>`` (and its MLflow store is shared)."""
        self.runs += 1
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        if self.entry == "cli":
            command = [sys.executable, "-m", "dtr_core", "--output-dir", str(folder / name),
                       "--cache-dir", str(folder / "cache"), *self.dtr_args]
        else:
            command = [sys.executable, "-m", "flows.dtr", f"output_dir={folder}", *self.dtr_args]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{name}.log", "w") as log:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run_folder(self, folder: Path, name: str, pid: int) -> Path | None:
        if self.entry == "cli":
            return folder / name
        found = list((folder / "runs").glob(f"*_{pid}-*"))
        return found[0] if len(found) == 1 else None

    def finish(self, folder: Path, name: str) -> dict:
        """A run to its end: its exit status, export (file → sha256) and log."""
        process = self.start(folder, name)
        return self.result(process, folder, name)

    def result(self, process: subprocess.Popen, folder: Path, name: str) -> dict:
        try:
            returncode = process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
        log = (folder / f"{name}.log").read_text(errors="replace")
        return {"returncode": returncode, "export": export_digests(self.run_folder(folder, name, process.pid)),
                "log": log}

    # --- phases --------------------------------------------------------------------------------

    def reference(self) -> dict:
        folder = fresh(self.out / "reference")
        started = time.time()
        run = self.finish(folder, "run")
        if run["returncode"] != 0:
            raise SystemExit(f"the reference run failed:\n{run['log'][-3000:]}")
        cache = StageCache(folder / "cache")
        entries = [{"stage": e["stage"], "key": e["key"],
                    "seconds": e["time"] - cache.lock_path(e["stage"], e["key"]).stat().st_mtime}
                   for e in cache.journal()]
        return {"export": run["export"], "entries": entries, "seconds": time.time() - started}

    def kills(self, count: int, reference: dict) -> dict:
        folder = fresh(self.out / "kills")
        cache = StageCache(folder / "cache")
        kinds = [stage for stage in STAGES if any(e["stage"] == stage for e in reference["entries"])]
        kills, cycles = [], []
        for index in range(count):
            kind = kinds[index % len(kinds)]
            left = [e for e in reference["entries"] if e["stage"] == kind
                    and not cache.manifest_path(e["stage"], e["key"]).exists()]
            if not left:  # every result of this kind is done: finish the cycle, start an empty one
                cycles.append(self.check(self.finish(folder, f"cycle-{len(cycles)}"), reference))
                shutil.rmtree(folder / "cache")
                left = [e for e in reference["entries"] if e["stage"] == kind]
            target = self.rng.choice(left)
            process = self.start(folder, f"kill-{index}")
            held = wait_for_lock(process, cache.lock_path(target["stage"], target["key"]), self.timeout)
            delay = self.rng.uniform(0, target["seconds"]) if held else 0.0
            time.sleep(delay)
            alive = process.poll() is None
            if alive:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills.append({"aimed_at": kind, "key": target["key"][:12], "killed": alive and held,
                          "delay": round(delay, 3), "returncode": process.returncode})
        final = self.check(self.finish(folder, "final"), reference)
        return {"kills": kills, "cycles": cycles, "final": final,
                "landed": dict(collections.Counter(k["aimed_at"] for k in kills if k["killed"])),
                "ok": final["ok"] and all(c["ok"] for c in cycles)}

    def concurrent(self, count: int, reference: dict) -> dict:
        folder = fresh(self.out / f"concurrent-{count}")
        started = time.time()
        processes = [self.start(folder, f"run-{i}") for i in range(count)]
        runs = [self.check(self.result(p, folder, f"run-{i}"), reference) for i, p in enumerate(processes)]
        computed = collections.Counter((e["stage"], e["key"]) for e in StageCache(folder / "cache").journal())
        expected = {(e["stage"], e["key"]) for e in reference["entries"]}
        twice = sorted(f"{stage} {key[:12]}" for (stage, key), n in computed.items() if n > 1)
        return {"runs": runs, "seconds": round(time.time() - started, 1), "results": len(computed),
                "computed_twice": twice, "missing": len(expected - set(computed)),
                "waits": sum(r["waits"] for r in runs),
                "ok": all(r["ok"] for r in runs) and not twice and set(computed) == expected}

    def damage(self, folder: Path, reference: dict) -> dict:
        """``folder`` holds a finished run's cache; each round damages it and runs again."""
        cache = StageCache(folder / "cache")
        rounds = []
        for number, how in enumerate(DAMAGE_ROUNDS):
            damaged = []
            for entry, path in self.targets(cache, reference, how):
                damage_file(path, how, self.rng)
                damaged.append({**entry, "file": str(path)})
            before = collections.Counter((e["stage"], e["key"]) for e in cache.journal())
            finished = self.finish(folder, f"damage-{number}")
            run = self.check(finished, reference)
            after = collections.Counter((e["stage"], e["key"]) for e in cache.journal())
            warnings = [line for line in finished["log"].splitlines() if "WARNING: the cached result" in line]
            for entry in damaged:
                path = str(cache.manifest_path(entry["stage"], entry["key"]))
                entry["warned"] = any(path in line for line in warnings)
                entry["recomputed"] = after[entry["stage"], entry["key"]] > before[entry["stage"], entry["key"]]
            rounds.append({"damage": how, "run": run, "damaged": damaged, "warnings": len(warnings),
                           "ok": run["ok"] and all(e["warned"] and e["recomputed"] for e in damaged)})
        return {"rounds": rounds, "ok": all(r["ok"] for r in rounds)}

    def targets(self, cache: StageCache, reference: dict, how: str) -> list[tuple[dict, Path]]:
        """What a round damages, per stage kind: a manifest, and (truncated or bit-flipped) one file a
        manifest lists, of another result of that kind when there is one. Over the three rounds every
        kind of cache file meets every damage that applies to it."""
        chosen = []
        for stage in STAGES:
            entries = [e for e in reference["entries"] if e["stage"] == stage]
            listed = {e["key"]: sorted(json.loads(cache.manifest_path(stage, e["key"]).read_text())["files"])
                      for e in entries}
            with_files = [e for e in entries if listed[e["key"]]]
            if how != "edit" and with_files:
                entry = self.rng.choice(with_files)
                chosen.append((entry, Path(self.rng.choice(listed[entry["key"]]))))
                entries = [e for e in entries if e is not entry]
            if entries:
                entry = self.rng.choice(entries)
                chosen.append((entry, cache.manifest_path(stage, entry["key"])))
        return chosen

    @staticmethod
    def check(run: dict, reference: dict) -> dict:
        """A finished run's verdict: exit 0 and the reference's export, file by file."""
        same = run["export"] == reference["export"]
        return {"returncode": run["returncode"], "same_export": same, "ok": run["returncode"] == 0 and same,
                "waits": run["log"].count("waiting for another run computing it"),
                **({} if run["returncode"] == 0 else {"log_tail": run["log"][-2000:]})}


# --- helpers ----------------------------------------------------------------------------------

def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def export_digests(run_folder: Path | None) -> dict[str, str]:
    hybrid = run_folder / "hybrid" if run_folder is not None else None
    return {p.name: sha256_file(p) for p in sorted(hybrid.iterdir())} if hybrid and hybrid.is_dir() else {}


def lock_is_held(path: Path) -> bool:
    """Whether a process holds ``path``'s lock now (a held lock is let go at once if it was free)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for_lock(process: subprocess.Popen, path: Path, timeout: float) -> bool:
    """Until ``process`` holds the lock at ``path`` (True) or ends (False)."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if lock_is_held(path):
            return True
        time.sleep(0.002)
    return False


def damage_file(path: Path, how: str, rng: random.Random) -> None:
    """Truncate ``path`` to half, flip one bit, or (a manifest) edit one value of its content into
    another valid one, as a hand edit would. The damaged file replaces ``path`` (a new inode): the
    exports of earlier runs, hard links to the cache's files, stay as they were."""
    data = path.read_bytes()
    if how == "truncate":
        damaged = data[: len(data) // 2]
    elif how == "bit-flip":
        while True:
            position, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
            damaged = data[:position] + bytes([data[position] ^ bit]) + data[position + 1:]
            if path.suffix != ".json" or not same_json(data, damaged):  # "1e-05" → "1E-05" is no damage
                break
    else:
        manifest = json.loads(data)
        manifest["value"] = edited(manifest["value"])
        damaged = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    replacement = path.with_name(path.name + ".damaged")
    replacement.write_bytes(damaged)
    os.replace(replacement, path)


def same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def edited(value):
    """A manifest's ``value`` with its first number (or, without numbers, its first string) changed:
    another valid value, as a hand edit would make."""
    leaves = list(_leaves(value))
    for kind, change in (((int, float), lambda leaf: leaf + 1), (str, lambda leaf: leaf + "x")):
        for container, key in leaves:
            leaf = container[key]
            if isinstance(leaf, kind) and not isinstance(leaf, bool):
                container[key] = change(leaf)
                return value
    raise ValueError(f"nothing to edit in {value!r}")


def _leaves(node):
    """(container, key) of every scalar in nested dicts and lists, in order."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, item in items:
        if isinstance(item, (dict, list)):
            yield from _leaves(item)
        else:
            yield node, key


def summary(results: dict) -> str:
    lines = [f"reference run: {results['reference']['seconds']:.1f}s, {len(results['reference']['entries'])} "
             "stage results"]
    if "kills" in results:
        kills = results["kills"]
        killed = sum(k["killed"] for k in kills["kills"])
        lines.append(f"kills: {killed}/{len(kills['kills'])} SIGKILLs inside a stage ({kills['landed']}); "
                     f"{len(kills['cycles'])} cycle(s) finished; final rerun "
                     f"{'exports the reference' if kills['final']['ok'] else 'FAILED'}")
    for count, phase in results.get("concurrent", {}).items():
        lines.append(f"{count} concurrent runs: exit codes {[r['returncode'] for r in phase['runs']]}, "
                     f"same export {all(r['same_export'] for r in phase['runs'])}, {phase['results']} results, "
                     f"computed twice {len(phase['computed_twice'])}, waits {phase['waits']}, {phase['seconds']}s")
    if "damage" in results:
        for round_ in results["damage"]["rounds"]:
            damaged = round_["damaged"]
            lines.append(f"damage ({round_['damage']}, {len(damaged)} results): exit {round_['run']['returncode']}, "
                         f"warned {sum(e['warned'] for e in damaged)}/{len(damaged)}, recomputed "
                         f"{sum(e['recomputed'] for e in damaged)}/{len(damaged)}, same export "
                         f"{round_['run']['same_export']}")
    lines.append(f"runs: {results['runs']}; {results['seconds']:.0f}s; {'PASS' if results['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, dtr_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    parser = argparse.ArgumentParser(prog="python tools/torture.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/torture", help="working folder (emptied phase by phase)")
    parser.add_argument("--entry", choices=("cli", "flow"), default="cli",
                        help="runs of 'python -m dtr_core' or of the flow ('python -m flows.dtr')")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs, aimed at each stage kind in turn")
    parser.add_argument("--concurrent", default="2,4", help="comma-separated numbers of runs started together "
                                                             "('' for none)")
    parser.add_argument("--damage", action=argparse.BooleanOptionalAction, default=True,
                        help="damage every kind of cache file, then rerun")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any one run may take")
    args = parser.parse_args(own)
    out = Path(args.out).resolve()
    dtr_args = DEFAULT_ARGS[args.entry] if dtr_args is None else dtr_args
    torture = Torture(out, args.entry, dtr_args, random.Random(args.seed), args.timeout)
    started = time.time()
    results: dict = {"entry": args.entry, "arguments": dtr_args}
    results["reference"] = reference = torture.reference()
    checks = []
    if args.kills:
        results["kills"] = torture.kills(args.kills, reference)
        checks.append(results["kills"]["ok"])
    counts = [int(n) for n in args.concurrent.split(",") if n.strip()]
    if counts:
        results["concurrent"] = {str(n): torture.concurrent(n, reference) for n in counts}
        checks += [phase["ok"] for phase in results["concurrent"].values()]
    if args.damage:
        # The kills' cache is finished by its last run; otherwise the reference's is damaged.
        results["damage"] = torture.damage(out / ("kills" if args.kills else "reference"), reference)
        checks.append(results["damage"]["ok"])
    results.update(runs=torture.runs, seconds=time.time() - started, ok=all(checks))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(summary(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
