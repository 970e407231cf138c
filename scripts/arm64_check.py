"""ARM64 check: the agent's `infer` on every shipped bundle, emulated aarch64 against x86_64 (`make arm64-check`).

What it does (as root on Debian/Ubuntu; nothing is fetched but Debian packages and PyPI wheels):
1. installs Debian's `qemu-user-static` and `mmdebstrap` when missing;
2. extracts a minimal Debian bookworm arm64 root (python3.11 and the C++ runtime) into build/arm64/root; no
   binfmt registration is needed: the arm64 Python runs as `qemu-aarch64-static -cpu CPU -L root python3.11`;
3. installs the pinned aarch64 wheels from deploy/docker/requirements-arm64.txt (hash-checked, the lock
   Dockerfile.arm64 uses) into build/arm64/site-aarch64, and the x86_64 files of the same pins into
   build/arm64/site-x86_64, so both sides run the same package versions;
4. runs `edge-agent infer IMAGES --model NAME --json --threads 1` for every bundle under models/, once natively
   (x86_64 reference) and once per emulated CPU (default: cortex-a72 = Raspberry Pi 4, cortex-a76 = Pi 5);
5. compares (see compare_docs): the same labels, verdicts and detections; scores within a tolerance relative to
   max(1, |x86 score|) (absolute for probabilities; anomaly scores are unbounded distances) and box corners within
   a tolerance in pixels, both per precision (TOLERANCES: FP32 0.03 and 16 px, INT8 0.06 and 16 px). Prints a
   table, writes build/arm64/report.json and exits 1 on any mismatch (2 when a setup step fails). Emulated times
   say nothing about a real board's speed.

Sample images, 3 per bundle: tests/data for the crop and detector bundles, the shared datasets (../shared/datasets,
or --shared DIR) for the steel and tile ones, which have no licensed copy in this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib  # the check runs on Python 3.11 (PYTHON_VERSION)
from arm64_compare import TOLERANCES, Diff, compare_docs, precision, score_threshold

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "arm64"
LOCK = ROOT / "deploy" / "docker" / "requirements-arm64.txt"
PYTHON_VERSION = "3.11"  # Debian bookworm's python3 and Dockerfile.arm64's base image
SUITE = "bookworm"
ROOT_PACKAGES = ("python3.11", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "libgomp1", "ca-certificates")
AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
DEFAULT_CPUS = ("cortex-a72", "cortex-a76")
# What /proc/cpuinfo says on a board with each emulated CPU. qemu-user passes the host's (x86) /proc/cpuinfo
# through, and onnxruntime's CPU probe (cpuinfo) crashes at import when it finds no ARM core in it (SIGSEGV, seen
# with onnxruntime 1.32), so each CPU gets its own root whose proc/cpuinfo names the core a real kernel reports.
CPUINFO: dict[str, tuple[str, str, str, str]] = {  # features, variant, part, revision
    "cortex-a72": ("fp asimd evtstrm crc32 cpuid", "0x0", "0xd08", "3"),  # Raspberry Pi 4 (BCM2711)
    "cortex-a76": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                   "asimddp", "0x4", "0xd0b", "1"),  # Raspberry Pi 5 (BCM2712)
    "neoverse-n1": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                    "asimddp ssbs", "0x3", "0xd0c", "1"),  # Arm servers (Graviton 2, Ampere Altra)
}

# Per bundle, sample images: "tests/data/..." in this repository (licensed copies, tests/data/LICENSES.md), the others
# relative to the shared datasets folder (NEU steel, magnetic tile and cattle chute have no licence, so no copy lives
# here).
# The cow photo for crop_disease is there on purpose: the classifier must answer "not recognised" on both sides.
COCO = "tests/data/coco_demo/images"
TILE = "inspection/magnetic_tile/test"
DETECTOR_IMAGES = (f"{COCO}/000000078499.jpg", f"{COCO}/000000214753.jpg", f"{COCO}/000000261888.jpg")
TILE_IMAGES = (f"{TILE}/good/exp1_num_11276.jpg", f"{TILE}/crack/exp1_num_249594.jpg",
               f"{TILE}/blowhole/exp1_num_108719.jpg")
SAMPLES: dict[str, tuple[str, ...]] = {
    "crop_disease": (
        "tests/data/crops/plantvillage/Apple___Apple_scab/0208f4eb-45a4-4399-904e-989ac2c6257c___FREC_Scab_3037.jpg",
        "tests/data/crops/ibean/bean_rust/bean_rust_train_0.jpg",
        f"{COCO}/000000078499.jpg",
    ),
    "steel_defects": (
        "inspection/neu_steel/train/crazing/crazing_2.jpg",
        "inspection/neu_steel/train/patches/patches_1.jpg",
        "inspection/neu_steel/train/scratches/scratches_1.jpg",
    ),
    "tile_anomaly": TILE_IMAGES,
    "tile_anomaly_int8": TILE_IMAGES,
    "yolox_nano": DETECTOR_IMAGES,
    "nanodet_m_320": DETECTOR_IMAGES,
    "nanodet_m_320_int8": DETECTOR_IMAGES,
    "cattle_overhead": (  # the chute frames have no licence either: read from the shared folder
        "livestock/cattle_chute/train/images/frame_002376.jpg",
        "livestock/cattle_chute/train/images/frame_003128.jpg",
        "livestock/cattle_chute/train/images/frame_005048.jpg",
    ),
}


class CheckError(Exception):
    """A setup step failed: the message says which and what to do."""


def log(msg: str) -> None:
    print(f"arm64-check: {msg}", file=sys.stderr, flush=True)


def pip_env() -> dict[str, str]:
    """PyPI only: no machine-wide extra indexes or local wheel folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_FIND_LINKS", "PIP_EXTRA_INDEX"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def sh(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a program with an argument list (never a shell), its name looked up on PATH."""
    exe = shutil.which(cmd[0]) or cmd[0]
    return subprocess.run([exe, *cmd[1:]], text=True, check=kwargs.pop("check", True), **kwargs)  # noqa: S603


def ensure_debian_tools() -> Path:
    """qemu-aarch64-static and mmdebstrap, installed with apt-get when missing; returns the qemu binary."""
    need = [pkg for exe, pkg in (("qemu-aarch64-static", "qemu-user-static"), ("mmdebstrap", "mmdebstrap"))
            if shutil.which(exe) is None]
    if need:
        if os.geteuid() != 0:
            raise CheckError(f"missing {', '.join(need)}: run as root, or `sudo apt-get install {' '.join(need)}`")
        log(f"installing {', '.join(need)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update", "-q"], env=env)
        sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *need], env=env)
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise CheckError("qemu-aarch64-static not found after installing qemu-user-static")
    return Path(qemu)


def ensure_arm64_root(mirror: str | None) -> Path:
    """A Debian arm64 root with python3.11, extracted (no maintainer scripts run, so no emulation needed)."""
    root = WORK / "root"
    stamp = root / ".edge-agent-root"
    want = f"{SUITE} {mirror or 'default'} {' '.join(ROOT_PACKAGES)}\n"
    if stamp.exists() and stamp.read_text() == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    log(f"extracting a Debian {SUITE} arm64 root with {', '.join(ROOT_PACKAGES)} (mmdebstrap)")
    root.parent.mkdir(parents=True, exist_ok=True)
    sh(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64",
        f"--include={','.join(ROOT_PACKAGES)}", SUITE, str(root), *([mirror] if mirror else [])])
    stamp.write_text(want)
    return root


def cpu_root(root: Path, cpu: str) -> Path:
    """A root for one emulated CPU: links to the arm64 root's folders plus a proc/cpuinfo naming that core."""
    if cpu not in CPUINFO:
        raise CheckError(f"no /proc/cpuinfo description for CPU {cpu!r}: add it to CPUINFO in {__file__} "
                         f"(known: {', '.join(CPUINFO)})")
    features, variant, part, revision = CPUINFO[cpu]
    dest = WORK / f"cpu-{cpu}"
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "proc").mkdir(parents=True)
    for entry in root.iterdir():
        if entry.name not in ("proc", "sys") and not entry.name.startswith("."):
            (dest / entry.name).symlink_to(entry.resolve())
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n"
        for i in range(os.cpu_count() or 1)  # as many as the host's /sys/devices/system/cpu, which qemu passes
    ]
    (dest / "proc" / "cpuinfo").write_text("\n".join(blocks))
    return dest


def ensure_site(name: str, platform_args: list[str]) -> Path:
    """The locked wheels (hash-checked, no dependency resolution) installed with pip --target."""
    target = WORK / f"site-{name}"
    stamp = target / ".lock-sha256"
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return target
    if target.exists():
        shutil.rmtree(target)
    log(f"installing {LOCK.relative_to(ROOT)} for {name} into {target.relative_to(ROOT)}")
    sh([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
        "--require-hashes", "--only-binary=:all:", "--target", str(target), *platform_args, "-r", str(LOCK)],
       env=pip_env())
    stamp.write_text(digest)
    return target


def entry_point() -> tuple[str, str]:
    """`edge-agent`'s module and function, from pyproject.toml (so a moved CLI module is followed)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["edge-agent"].split(":")
    return module, func


@dataclass
class Run:
    """One `infer` run: its per-image JSON documents and wall time."""

    docs: list[dict[str, Any]]
    wall_s: float


def run_infer(prefix: list[str], site: Path, bundle: str, images: list[Path]) -> Run:
    module, func = entry_point()
    code = (f"import sys; sys.argv[0] = 'edge-agent'; from {module} import {func} as main; main()")
    env = {**pip_env(), "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*prefix, "-S", "-c", code, "infer", *map(str, images), "--model", bundle,
           "--models-dir", str(ROOT / "models"), "--threads", "1", "--json"]
    t0 = time.perf_counter()
    proc = sh(cmd, capture_output=True, env=env, cwd=WORK, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CheckError(f"infer --model {bundle} failed (exit {proc.returncode}) under {prefix[0]}:\n"
                         f"{proc.stderr[-3000:]}")
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(docs) != len(images):
        raise CheckError(f"infer --model {bundle}: {len(docs)} results for {len(images)} images")
    return Run(docs, wall)


def median_ms(run: Run, stage: str) -> float:
    return statistics.median(float(d["timings_ms"][stage]) for d in run.docs)


def bundles() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "models").glob("*/manifest.json"))


def main() -> int:
    ap = argparse.ArgumentParser(description="Emulated-aarch64 infer vs x86_64 for every bundle under models/.")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                    help="the shared folder holding datasets/ (default: ../shared)")
    ap.add_argument("--cpu", action="append", help=f"qemu CPU model, repeatable (default: {', '.join(DEFAULT_CPUS)})")
    ap.add_argument("--bundle", action="append", help="only this bundle (repeatable; default: every bundle)")
    ap.add_argument("--mirror", help="Debian mirror for the arm64 root (default: mmdebstrap's, with updates and "
                    "security)")
    ap.add_argument("--report", type=Path, default=WORK / "report.json", help="where to write the figures (JSON)")
    args = ap.parse_args()
    cpus: list[str] = args.cpu or list(DEFAULT_CPUS)
    names: list[str] = args.bundle or bundles()
    datasets = args.shared / "datasets"
    try:
        if sys.version_info[:2] != (3, 11):
            raise CheckError(f"run with Python {PYTHON_VERSION} (the lock's and the arm64 root's version), "
                             f"not {sys.version_info.major}.{sys.version_info.minor}")
        unknown = [c for c in cpus if c not in CPUINFO]
        if unknown:
            raise CheckError(f"no /proc/cpuinfo description for CPU(s) {', '.join(unknown)}: "
                             f"known {', '.join(CPUINFO)}")
        missing = [n for n in names if n not in SAMPLES]
        if missing:
            raise CheckError(f"no sample images for bundle(s) {', '.join(missing)}: add them to SAMPLES in {__file__}")
        shared_needed = sorted(n for n in names if any(not r.startswith("tests/data/") for r in SAMPLES[n]))
        if shared_needed and not datasets.is_dir():
            raise CheckError(f"the sample images of {', '.join(shared_needed)} are read from {datasets}, which does "
                             "not exist: pass --shared DIR (make arm64-check SHARED=DIR)")
        qemu = ensure_debian_tools()
        root = ensure_arm64_root(args.mirror)
        py_tag = PYTHON_VERSION.replace(".", "")
        arm_site = ensure_site("aarch64", [
            *[f"--platform={p}" for p in AARCH64_PLATFORMS],
            f"--python-version={PYTHON_VERSION}", "--implementation=cp", f"--abi=cp{py_tag}",
        ])
        x86_site = ensure_site("x86_64", [])
        arm_python = root / "usr" / "bin" / f"python{PYTHON_VERSION}"
        rows: list[dict[str, Any]] = []
        failed = False
        for name in names:
            images = [ROOT / rel if rel.startswith("tests/data/") else datasets / rel for rel in SAMPLES[name]]
            absent = [str(p) for p in images if not p.is_file()]
            if absent:
                raise CheckError(f"{name}: sample image(s) missing: {', '.join(absent)}")
            bundle = ROOT / "models" / name
            kind, threshold = precision(bundle), score_threshold(bundle)
            tol = TOLERANCES[kind]
            log(f"{name} ({kind}): x86_64 reference")
            ref = run_infer([sys.executable], x86_site, name, images)
            for cpu in cpus:
                log(f"{name}: aarch64 emulated as {cpu}")
                prefix = cpu_root(root, cpu)
                got = run_infer(["nice", "-n", "10", str(qemu), "-cpu", cpu, "-L", str(prefix), str(arm_python)],
                                arm_site, name, images)
                diff = Diff()
                for r, g in zip(ref.docs, got.docs, strict=True):
                    compare_docs(r, g, tol, threshold, diff)
                failed = failed or bool(diff.problems)
                rows.append({
                    "bundle": name, "precision": kind, "cpu": cpu, "images": len(images),
                    "score_tol": tol.score, "box_tol_px": tol.box_px,
                    "predictions": sum(len(d["predictions"]) for d in ref.docs),
                    "labels": [[p["label"] for p in d["predictions"]] for d in ref.docs],
                    "max_score_diff": diff.max_score, "max_box_diff_px": diff.max_box,
                    "x86_inference_ms": median_ms(ref, "inference"), "arm_inference_ms": median_ms(got, "inference"),
                    "x86_wall_s": ref.wall_s, "arm_wall_s": got.wall_s,
                    "ok": not diff.problems, "problems": diff.problems,
                })
    except (CheckError, subprocess.CalledProcessError) as exc:
        print(f"arm64-check: error: {exc}", file=sys.stderr)
        return 2
    print_table(rows, cpus)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({
        "tolerances": {k: {"score": t.score, "box_px": t.box_px} for k, t in TOLERANCES.items()},
        "cpus": cpus, "threads": 1, "python": PYTHON_VERSION,
        "lock": str(LOCK.relative_to(ROOT)), "rows": rows,
    }, indent=1) + "\n")
    for row in rows:
        for problem in row["problems"]:
            print(f"MISMATCH {row['bundle']} ({row['cpu']}): {problem}")
    tols = "; ".join(f"{k}: score {t.score}, box {t.box_px} px" for k, t in TOLERANCES.items())
    print(f"{'FAILED' if failed else 'OK'}: {len(rows)} bundle x CPU runs; tolerances (score relative to "
          f"max(1, |x86|)) {tols}; report {args.report}")
    return 1 if failed else 0


def print_table(rows: list[dict[str, Any]], cpus: list[str]) -> None:
    head = ("bundle", "precision", "cpu", "images", "preds", "max score diff", "max box diff px", "x86 ms",
            "arm64-emu ms", "x86 wall s", "arm64-emu wall s", "")
    lines = [head, *[(r["bundle"], r["precision"], r["cpu"], str(r["images"]), str(r["predictions"]),
                      f"{r['max_score_diff']:.2e}",
                      f"{r['max_box_diff_px']:.3f}", f"{r['x86_inference_ms']:.1f}", f"{r['arm_inference_ms']:.1f}",
                      f"{r['x86_wall_s']:.1f}", f"{r['arm_wall_s']:.1f}", "ok" if r["ok"] else "MISMATCH")
                     for r in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths).rstrip())
    print(f"(ms: median inference per image, one intra-op thread; arm64 emulated by qemu-user as {', '.join(cpus)},"
          " so its times are not a board's)")


if __name__ == "__main__":
    sys.exit(main())
