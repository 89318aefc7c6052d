"""Workloads for ``sllm schedule-plan --simulate``: request arrivals and the models they ask for.

- :func:`read_azure_trace`: a CSV in the Azure LLM inference trace schema
  (``TIMESTAMP,ContextTokens,GeneratedTokens``, one row per request; the traces published
  with Splitwise, CC BY 4.0), optionally rescaled to a mean rate and cut to a duration;
- :func:`gamma_arrivals`: the synthetic process the ServerlessLLM paper used (§7: Gamma
  inter-arrival times with a given mean rate and coefficient of variation), from a seed;
- :func:`parse_trace_spec` picks one of the two from the ``TRACE`` argument
  (``gamma:rps=1.4,cv=8,duration=600[,prompt=512,gen=64]`` or a file path);
- :func:`parse_models` reads ``--models`` (``NAME=SIZE[xCOUNT],...``) and
  :func:`assign_models` gives each request a model (uniform or Zipf popularity, seeded).

Plain data in and out; it reads only the trace file. It knows nothing of nodes.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from sllm.errors import UsageError

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


@dataclass(frozen=True)
class Request:
    """One request of a workload.

    Attributes:
        id: index in the workload. arrival_seconds: from the workload's start.
        prompt_tokens, generated_tokens: its token counts. model: the model it asks for
        ("" until :func:`assign_models`). door: the node it is sent to ("" for none: the
        scheduler's choice is where it enters).
    """

    id: int
    arrival_seconds: float
    prompt_tokens: int
    generated_tokens: int
    model: str = ""
    door: str = ""


def _parse_time(text: str, where: str) -> float:
    text = text.strip()
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.(\d+))?", text)
    if not m:
        raise UsageError(f"{where}: TIMESTAMP {text!r}: expected YYYY-MM-DD HH:MM:SS[.fraction]")
    base = datetime.fromisoformat(m.group(1).replace(" ", "T")).timestamp()
    frac = m.group(2) or "0"
    return base + int(frac) / 10 ** len(frac)


def read_azure_trace(
    path: str | Path, *, rps: float | None = None, duration: float | None = None, limit: int | None = None
) -> list[Request]:
    """Requests of an Azure LLM inference trace CSV, arrivals relative to the first row.

    Args:
        path: the CSV (header ``TIMESTAMP,ContextTokens,GeneratedTokens``).
        rps: rescale the arrival times so that the mean rate is ``rps`` requests/s (the
            inter-arrival pattern kept); None keeps the recorded times.
        duration: keep the requests arriving in the first ``duration`` seconds (after rescaling).
        limit: keep at most this many requests.

    Raises:
        UsageError: unreadable file, a missing column, or a bad row (the message names the
            file and the line).
    """
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the trace: {exc.strerror or exc}") from exc
    rows: list[tuple[float, int, int]] = []
    with f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise UsageError(f"{path}: not an Azure LLM inference trace: the header must have "
                             f"{', '.join(sorted(need))} (it has {', '.join(reader.fieldnames or []) or 'nothing'})")
        for line, row in enumerate(reader, 2):
            where = f"{path}:{line}"
            try:
                ctx, gen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (TypeError, ValueError):
                raise UsageError(f"{where}: token counts must be whole numbers") from None
            if ctx < 0 or gen < 0:
                raise UsageError(f"{where}: negative token count")
            rows.append((_parse_time(row["TIMESTAMP"] or "", where), ctx, gen))
            if limit is not None and len(rows) >= limit and rps is None and duration is None:
                break
    if not rows:
        raise UsageError(f"{path}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    times = [t - t0 for t, _, _ in rows]
    if rps is not None:
        span = times[-1] if times[-1] > 0 else 1.0
        scale = (len(rows) / span) / rps  # recorded mean rate / wanted rate
        times = [t * scale for t in times]
    out = [Request(i, t, c, g) for i, (t, (_, c, g)) in enumerate(zip(times, rows))]
    if duration is not None:
        out = [r for r in out if r.arrival_seconds < duration]
    return out[:limit] if limit is not None else out


def gamma_arrivals(
    rps: float, cv: float, duration: float, *, seed: int = 0, prompt_tokens: int = 512, generated_tokens: int = 64
) -> list[Request]:
    """Arrivals with Gamma-distributed gaps: mean ``1/rps`` s, coefficient of variation ``cv``
    (shape ``1/cv^2``, scale ``cv^2/rps``; ServerlessLLM §7), for ``duration`` seconds.

    Raises:
        UsageError: a non-positive rate, cv or duration.
    """
    if rps <= 0 or cv <= 0 or duration <= 0:
        raise UsageError("gamma: rps, cv and duration must be positive")
    rng = random.Random(seed)
    shape, scale = 1.0 / (cv * cv), cv * cv / rps
    out, t = [], 0.0
    while True:
        t += rng.gammavariate(shape, scale)
        if t >= duration:
            return out
        out.append(Request(len(out), t, prompt_tokens, generated_tokens))


def parse_trace_spec(spec: str, *, seed: int = 0, rps: float | None = None, duration: float | None = None) -> list[Request]:
    """The workload named by ``TRACE``: ``gamma:rps=R,cv=C,duration=S[,prompt=N,gen=N]`` or an
    Azure trace CSV path (then ``rps``/``duration`` rescale and cut it).

    Raises:
        UsageError: a bad gamma spec, or as :func:`read_azure_trace`.
    """
    if spec.startswith("gamma:"):
        params: dict[str, float] = {}
        for part in filter(None, spec[len("gamma:"):].split(",")):
            key, sep, value = part.partition("=")
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise UsageError(f"TRACE {spec!r}: {part!r} is not KEY=NUMBER") from None
            if not sep or key.strip() not in ("rps", "cv", "duration", "prompt", "gen"):
                raise UsageError(f"TRACE {spec!r}: unknown key {key!r} (rps, cv, duration, prompt, gen)")
        if "rps" not in params and rps is None:
            raise UsageError(f"TRACE {spec!r}: give rps=R")
        return gamma_arrivals(rps if rps is not None else params["rps"], params.get("cv", 1.0),
                              duration if duration is not None else params.get("duration", 600.0), seed=seed,
                              prompt_tokens=int(params.get("prompt", 512)), generated_tokens=int(params.get("gen", 64)))
    return read_azure_trace(spec, rps=rps, duration=duration)


def _size(text: str, where: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", text.strip(), re.IGNORECASE)
    if not m:
        raise UsageError(f"{where}: {text!r} is not a size (e.g. 2.6GB, 512MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def parse_models(spec: str, known: Mapping[str, int] | None = None) -> dict[str, int]:
    """``--models``: comma-separated ``NAME=SIZE`` (``opt-1.3b=2.6GB``), ``NAME=SIZExCOUNT``
    (COUNT models ``NAME-0``... of that size) or ``NAME`` (size from ``known``: the
    inventory's ``[models]``). Returns name -> bytes, in the order given.

    Raises:
        UsageError: a bad entry, an unknown size, a duplicate name.
    """
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, rest = part.partition("=")
        name = name.strip()
        count = 1
        if sep:
            size_text, x, count_text = rest.rpartition("x") if re.search(r"x\d+$", rest) else (rest, "", "")
            size = _size(size_text, f"--models {part!r}")
            count = int(count_text) if x else 1
        elif known and name in known:
            size = int(known[name])
        else:
            raise UsageError(f"--models {part!r}: give NAME=SIZE (no size for {name!r} in the inventory's [models])")
        names = [name] if count == 1 else [f"{name}-{i}" for i in range(count)]
        for n in names:
            if n in out:
                raise UsageError(f"--models: {n!r} given twice")
            out[n] = size
    if not out:
        raise UsageError("--models: no models given")
    return out


def assign_models(requests: Sequence[Request], models: Sequence[str], *, seed: int = 0,
                  popularity: str = "uniform") -> list[Request]:
    """Give each request a model drawn from ``models``: ``uniform`` or ``zipf:S`` (the i-th
    model drawn with weight ``1 / (i + 1)^S``), from ``seed``.

    Raises:
        UsageError: an unknown popularity.
    """
    if popularity == "uniform":
        weights = [1.0] * len(models)
    elif popularity.startswith("zipf:"):
        try:
            s = float(popularity[5:])
        except ValueError:
            raise UsageError(f"--popularity {popularity!r}: zipf:S needs a number") from None
        weights = [1.0 / math.pow(i + 1, s) for i in range(len(models))]
    else:
        raise UsageError(f"--popularity {popularity!r}: choose uniform or zipf:S")
    rng = random.Random(seed)
    picks = rng.choices(list(models), weights=weights, k=len(requests))
    return [replace(r, model=m) for r, m in zip(requests, picks)]
