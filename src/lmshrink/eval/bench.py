"""Speed and memory of models side by side: prefill and decode tokens/s, time to first token, peak RSS, weight bytes.

Protocol: every model runs in its own worker process (so its peak RSS is its own) with the same number of torch
threads; the parent runs the trials interleaved (trial 1 of every model, then trial 2, ...), one worker at a time,
so slow drifts of a shared machine hit all models alike. A trial is a greedy generation without sampling:
a prompt of ``prompt_tokens`` tokens (the packaged held-out Wikipedia text from a seeded offset; seeded random ids
where it is unavailable) in one forward pass, then ``new_tokens`` single-token
forward passes with the KV cache. Time to first token = the prefill pass plus the argmax; prefill tokens/s =
prompt tokens / that time; decode tokens/s = new tokens / the time of the single-token passes. One warm-up trial
per model is discarded; the medians over the trials are reported with every trial's value. Peak RSS is reported
for the whole process (loading included) and, where Linux allows resetting the counter, for the trials only.

Decode paths (``decode=``, ``--decode``): ``hf`` runs transformers' own forward with its cache (the model as users
run it); ``fast`` runs lmshrink's lean decoder (``runtime/fastpath.py``: Llama-family models, greedy, batch 1, the
same modules and weights, its own forward and preallocated cache) with the same trial structure; ``both`` (the
default) gives every model an ``hf`` row and a ``fast`` row, so that the speed-up of the packed weights and that of
the leaner forward are seen apart; ratios stay relative to the first row (the first model's ``hf`` row).
``fast-q8`` is the fast path with the two approximations llama.cpp makes on CPU: the inputs of the int4 layers
rounded to int8 per block of 32 columns and lm_head run from a q8_0 copy (``FastDecoder(activations="int8",
head="int8")``; ``bench/decode_error.py`` measures what they cost in perplexity and KL); ``all`` adds a ``fast-q8``
row to ``both``'s. Each trial also records the process CPU time of the decode loop (``decode_cpu_tokens_per_s``),
steadier than wall time on a shared machine.

GGUF files given with ``llama_cpp=`` (``--llama-cpp``) run the same trials in llama.cpp (llama-cpp-python, an
optional extra) with the same thread count and the first row's prompt ids: the bar for lmshrink's own CPU runtime.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.core.process import high_water_mark, peak_rss_bytes, reset_high_water_mark, rss_bytes
from lmshrink.data.sources import load_text
from lmshrink.eval.size import model_size
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder
from lmshrink.formats.loading import load_model
from lmshrink.models.adapters import get_adapter, is_linear
from lmshrink.runtime.fastpath import FastDecoder
from lmshrink.runtime.int8 import Int8Linear
from lmshrink.runtime.qlinear import KERNEL_MAX_ROWS, OutlierLinear, QuantLinear, packed_bytes

# ---------------------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------------------


def _linear_bytes(model) -> dict[str, int]:
    """Bytes held by the linear layers inside the decoder blocks and their weight count.

    Linear layers as ``lmshrink.models.is_linear`` knows them (``nn.Linear`` and GPT-2's ``Conv1D``, also the two
    factors of a factorized layer, a shared basis once), plus packed ``QuantLinear`` layers (their codes, scales and
    zero points, the bias left out) and ``Int8Linear`` layers (codes, scales, and oneDNN's packed copy of the codes).
    The blocks are walked rather
    than ``iter_linears``, whose family layouts only match while every linear is still an unpacked one.
    """

    total, weights = 0, 0
    seen: set[int] = set()  # a module several blocks share (a basis shared across blocks) counts once
    for block in get_adapter(model).blocks(model):
        for module in block.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, QuantLinear):
                total += packed_bytes(module) - (0 if module.bias is None else module.bias.numel() * module.bias.element_size())
                weights += module.in_features * module.out_features
            elif isinstance(module, OutlierLinear):  # its QuantLinear is counted on its own
                total += sum(t.numel() * t.element_size() for t in (module.columns, module.values))
            elif isinstance(module, Int8Linear):  # codes, scales and oneDNN's packed copy of the codes
                total += module.nbytes() - (0 if module.bias is None else module.bias.numel() * 4)
                weights += module.in_features * module.out_features
            elif is_linear(module):
                total += module.weight.numel() * module.weight.element_size()
                weights += module.weight.numel()
    return {"linear_weight_bytes": total, "linear_weights": weights}


def _prompt(encode, vocab_size: int, tokens: int, seed: int):
    """``tokens`` prompt ids: the packaged held-out Wikipedia text from a seeded offset, else seeded random ids.

    ``encode(text)`` gives the text's token ids (a list or a 1-D tensor), without special tokens.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    try:
        source = load_text("enwiki-sample", "eval")
        ids = torch.as_tensor(encode(source.joined()), dtype=torch.long).reshape(1, -1)
        if ids.shape[1] > tokens:
            start = int(torch.randint(0, ids.shape[1] - tokens, (1,), generator=generator))
            return ids[:, start:start + tokens], f"enwiki-sample eval text, {tokens} tokens from a seeded offset"
    except Exception:  # noqa: BLE001 - any failure falls back to random ids, stated in the protocol
        pass
    return torch.randint(0, vocab_size, (1, tokens), generator=generator), "random token ids (seeded)"


def _given_prompt(prompt_ids: list[int], vocab: int, what: str, fix: str, source: str | None):
    """``(prompt [1, n], its description)`` from ids given by the caller (another row's prompt), checked against the
    model's vocabulary size: an id out of range raises an LmshrinkError naming ``what`` and ``fix``."""
    import torch

    if max(prompt_ids) >= vocab:
        raise LmshrinkError(f"{what} has token id {max(prompt_ids)}, the vocabulary has {vocab} tokens", fix=fix)
    return torch.tensor([prompt_ids], dtype=torch.long), source or "the first model's prompt ids"


class _Runner:
    def __init__(self, source: str, runtime: str, dtype: str, prompt_tokens: int, new_tokens: int, seed: int,
                 decode: str = "hf", prompt_ids: list[int] | None = None, prompt_source: str | None = None):
        start = time.perf_counter()
        self.loaded = load_model(source, runtime=runtime, dtype=dtype, progress=False)
        self.load_seconds = time.perf_counter() - start
        self.model = self.loaded.model
        self.rss_after_load = rss_bytes()
        tokenizer = self.loaded.tokenizer
        vocab = int(self.model.config.vocab_size)
        if prompt_ids is not None:  # the prompt of the model's first row, so that its rows decode the same ids
            self.prompt, self.prompt_source = _given_prompt(
                prompt_ids, vocab, f"{source}: the given prompt", "give prompt ids from this model's tokenizer",
                prompt_source)
        else:
            self.prompt, self.prompt_source = _prompt(
                lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids,
                vocab, prompt_tokens, seed)
        self.new_tokens = new_tokens
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.size = {**model_size(self.model), **_linear_bytes(self.model)}
        self.decode = decode
        self.decoder = None
        if decode in FAST_OPTIONS:
            self.decoder = FastDecoder(self.model, self.prompt.shape[1] + new_tokens, **FAST_OPTIONS[decode])

    def _cache_of(self, output):
        return getattr(output, "cache", None) if self.cache_arg == "cache" else output.past_key_values

    def trial(self) -> dict[str, Any]:
        if self.decoder is not None:
            return self._fast_trial()
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            output = self.model(self.prompt, use_cache=True, **self.keep)
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            first_cpu = time.process_time()
            cache = self._cache_of(output)
            tokens = [int(token)]
            for _ in range(self.new_tokens):
                output = self.model(token, use_cache=True, **{self.cache_arg: cache}, **self.keep)
                cache = self._cache_of(output)
                token = output.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
            end_cpu = time.process_time()
            end = time.perf_counter()
        return self._result(start, first, end, end_cpu - first_cpu, tokens)

    def _fast_trial(self) -> dict[str, Any]:
        """The same trial through FastDecoder: the prompt in one call, then one token per call, greedy."""
        decoder = self.decoder
        start = time.perf_counter()
        token = decoder.prefill(self.prompt).argmax(-1)
        first = time.perf_counter()
        first_cpu = time.process_time()
        tokens = [int(token)]
        for _ in range(self.new_tokens):
            token = decoder.step(token).argmax(-1)
            tokens.append(int(token))
        end_cpu = time.process_time()
        end = time.perf_counter()
        return self._result(start, first, end, end_cpu - first_cpu, tokens)

    def _result(self, start: float, first: float, end: float, decode_cpu: float, tokens: list[int]) -> dict[str, Any]:
        ttft = first - start
        return {"ttft_s": ttft, "prefill_tokens_per_s": self.prompt.shape[1] / ttft,
                "decode_tokens_per_s": self.new_tokens / (end - first),
                "decode_cpu_tokens_per_s": self.new_tokens / max(decode_cpu, 1e-9), "tokens": tokens}


LLAMA_CPP = "llama.cpp"
LLAMA_CPP_INSTALL = ("CMAKE_ARGS=-DGGML_AMX_INT8=OFF pip install -e '.[llama-cpp]' in the lmshrink checkout "
                     "(llama-cpp-python compiles for about 10 minutes; the flag avoids its AMX backend, which crashes "
                     "on some CPUs with AMX)")


def gguf_size(path: str) -> dict[str, int]:
    """Parameters and bytes of a GGUF file's tensors; ``linear_*``: the 2-D tensors of its blocks (``blk.N.*``)."""
    from gguf import GGUFReader

    size = {"parameters": 0, "weight_bytes": 0, "linear_weight_bytes": 0, "linear_weights": 0}
    for tensor in GGUFReader(path).tensors:
        size["parameters"] += int(tensor.n_elements)
        size["weight_bytes"] += int(tensor.n_bytes)
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            size["linear_weight_bytes"] += int(tensor.n_bytes)
            size["linear_weights"] += int(tensor.n_elements)
    return size


class _LlamaCppRunner:
    """The trial of ``_Runner`` (the prompt in one call, then one token per call, greedy) run by llama.cpp."""

    def __init__(self, path: str, threads: int, prompt_tokens: int, new_tokens: int, seed: int,
                 prompt_ids: list[int] | None = None, prompt_source: str | None = None):
        try:
            import llama_cpp
        except ImportError as exc:
            raise LmshrinkError("llama-cpp-python is not installed, so the llama.cpp row cannot run",
                                fix=LLAMA_CPP_INSTALL) from exc
        start = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(path, n_ctx=prompt_tokens + new_tokens + 16, n_batch=max(512, prompt_tokens),
                                       n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise LmshrinkError(f"llama.cpp could not load {path}: {exc}",
                                fix="pass a GGUF file written by `lmshrink export --to gguf` (or llama.cpp's tools) "
                                    "for a model family llama.cpp supports") from exc
        self.load_seconds = time.perf_counter() - start
        self.rss_after_load = rss_bytes()
        self.n_vocab = int(self.llm.n_vocab())
        self.version = llama_cpp.__version__
        if prompt_ids is not None:
            self.prompt, self.prompt_source = _given_prompt(
                prompt_ids, self.n_vocab, f"{path}: the first model's prompt (checked against the GGUF)",
                "benchmark the GGUF beside the model it was exported from (same tokenizer)", prompt_source)
        else:
            self.prompt, self.prompt_source = _prompt(
                lambda text: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
                self.n_vocab, prompt_tokens, seed)
        self.new_tokens = new_tokens
        self.threads = threads
        self.path = path
        self.size = gguf_size(path)

    def model_info(self) -> dict[str, Any]:
        return {"source": self.path, "kind": "gguf", "path": os.path.abspath(self.path), "runtime": LLAMA_CPP,
                "llama_cpp_python": self.version, "vocab_size": self.n_vocab,
                "parameters": self.size["parameters"]}

    def _next_token(self) -> int:
        import numpy as np

        # the logits of the last position evaluated (llama-cpp-python keeps none itself without logits_all)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def trial(self) -> dict[str, Any]:
        llm = self.llm
        start = time.perf_counter()
        llm.reset()  # the next eval drops the whole KV cache
        llm.eval(self.prompt[0].tolist())
        token = self._next_token()
        first = time.perf_counter()
        first_cpu = time.process_time()
        tokens = [token]
        for _ in range(self.new_tokens):
            llm.eval([token])
            token = self._next_token()
            tokens.append(token)
        end_cpu = time.process_time()
        end = time.perf_counter()
        ttft = first - start
        return {"ttft_s": ttft, "prefill_tokens_per_s": self.prompt.shape[1] / ttft,
                "decode_tokens_per_s": self.new_tokens / (end - first),
                "decode_cpu_tokens_per_s": self.new_tokens / max(end_cpu - first_cpu, 1e-9), "tokens": tokens}


def _worker_main(argv: list[str]) -> int:
    """Worker loop: load the model, then answer one JSON line per command read from stdin."""
    import torch

    args = json.loads(argv[0])
    torch.set_num_threads(args["threads"])
    try:
        if args["runtime"] == LLAMA_CPP:
            runner = _LlamaCppRunner(args["source"], args["threads"], args["prompt_tokens"], args["new_tokens"],
                                     args["seed"], args.get("prompt_ids"), args.get("prompt_source"))
            model_info, threads = runner.model_info(), runner.threads
        else:
            runner = _Runner(args["source"], args["runtime"], args["dtype"], args["prompt_tokens"],
                             args["new_tokens"], args["seed"], args.get("decode", "hf"), args.get("prompt_ids"),
                             args.get("prompt_source"))
            model_info, threads = runner.loaded.info.to_dict(), torch.get_num_threads()
    except LmshrinkError as err:
        print(json.dumps({"error": err.message, "fix": err.fix,
                          "unsupported": isinstance(err, UnsupportedArchitectureError)}), flush=True)
        return 0
    decoder = getattr(runner, "decoder", None)
    info = {"ready": True, "model": model_info, "load_seconds": runner.load_seconds,
            "decode": LLAMA_CPP if args["runtime"] == LLAMA_CPP else args.get("decode", "hf"),
            **({"fast_linears": decoder.linears, "kv_cache_bytes": decoder.cache_bytes()} if decoder is not None
               else {}),
            "rss_after_load_bytes": runner.rss_after_load, "size": runner.size, "threads": threads,
            "prompt_source": runner.prompt_source, "prompt_ids": runner.prompt[0].tolist(),
            "peak_rss_loading_bytes": peak_rss_bytes()}
    runner.peak_reset = reset_high_water_mark()
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "trial":
            print(json.dumps(runner.trial()), flush=True)
        elif command == "finish":
            since = high_water_mark() if runner.peak_reset else None
            peak = peak_rss_bytes()
            print(json.dumps({"peak_rss_bytes": peak, "peak_rss_running_bytes": since, "rss_bytes": rss_bytes()}),
                  flush=True)
            return 0
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, spec: dict[str, Any]):
        env = dict(os.environ)
        threads = str(spec["threads"])
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        self.process = subprocess.Popen([sys.executable, "-m", "lmshrink.eval.bench", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)

    def read(self, what: str) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            stderr = self.process.stderr.read()
            raise LmshrinkError(f"the benchmark worker died during {what}: {stderr.strip()[-2000:]}",
                                fix="run the model once with `lmshrink evaluate` to see whether it loads")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read(command)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _runtime_for(source: str, runtime: str) -> str:
    if runtime != "auto":
        return runtime

    return "packed" if os.path.isdir(source) and is_compressed_tensors_folder(source) else "dense"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, None where the denominator is 0 (nothing to compare with)."""
    return numerator / denominator if denominator else None


def _compare(rows: list[dict[str, Any]]) -> None:
    """Add each row's ratios to the first row (``vs_first``) and its linear bytes per fp16 byte
    (``linear_bytes_vs_fp16``); a ratio whose denominator is 0 (no linear weights counted) is None."""
    base = rows[0]
    for row in rows:
        row["vs_first"] = {
            "decode_speedup": _ratio(row["decode_tokens_per_s"], base["decode_tokens_per_s"]),
            "decode_cpu_speedup": _ratio(row["decode_cpu_tokens_per_s"], base["decode_cpu_tokens_per_s"]),
            "prefill_speedup": _ratio(row["prefill_tokens_per_s"], base["prefill_tokens_per_s"]),
            "linear_bytes_ratio": _ratio(row["size"]["linear_weight_bytes"], base["size"]["linear_weight_bytes"]),
        }
        row["linear_bytes_vs_fp16"] = _ratio(row["size"]["linear_weight_bytes"], 2 * row["size"]["linear_weights"])


DECODE_PATHS = ("hf", "fast", "fast-q8", "both", "all")
PATHS_OF = {"both": ["hf", "fast"], "all": ["hf", "fast", "fast-q8"]}
FAST_OPTIONS = {"fast": {}, "fast-q8": {"activations": "int8", "head": "int8"}}  # FastDecoder options per path


def bench(models: list[str], *, prompt_tokens: int = 256, new_tokens: int = 64, trials: int = 5, warmup: int = 1,
          threads: int = 1, runtime: str = "auto", dtype: str = "float32", seed: int = 0,
          llama_cpp: list[str] | tuple[str, ...] = (), decode: str = "both", progress: bool = True) -> dict[str, Any]:
    """Benchmark ``models`` side by side (see the module docstring for the protocol); returns a JSON-ready record.

    runtime: ``auto`` (compressed folders packed, other models dense), ``packed`` or ``dense`` for every model.
    decode: ``hf`` (transformers' forward), ``fast`` (lmshrink's FastDecoder), ``fast-q8`` (FastDecoder with int8
    activations and an int8 lm_head, approximations as llama.cpp makes them), ``both`` (an ``hf`` and a ``fast`` row
    per model) or ``all`` (``hf``, ``fast`` and ``fast-q8`` rows); with ``both``/``all`` a model the fast path does
    not support keeps its ``hf`` row, and ``protocol.fast_skipped`` says why. Every row's ``decode`` names its path.
    llama_cpp: GGUF files run by llama.cpp (llama-cpp-python), as rows after ``models``, with the same threads and
    the first model's prompt ids. Ratios are relative to the first row.
    """
    import torch


    models, llama_cpp = list(models), list(llama_cpp or ())
    if not models and not llama_cpp:
        raise LmshrinkError("no model to benchmark", fix="name one or more models, e.g. smollm2-135m out/model")
    for path in llama_cpp:
        if not os.path.isfile(path):
            raise LmshrinkError(f"--llama-cpp {path}: no such file",
                                fix="pass a GGUF file, e.g. one written by `lmshrink export DIR --to gguf -o x.gguf`")
    if llama_cpp:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise LmshrinkError("llama-cpp-python is not installed, so --llama-cpp cannot run", fix=LLAMA_CPP_INSTALL)
    if prompt_tokens < 1 or new_tokens < 1 or trials < 1 or warmup < 0 or threads < 1:
        raise LmshrinkError(f"prompt_tokens={prompt_tokens}, new_tokens={new_tokens}, trials={trials}, "
                            f"warmup={warmup}, threads={threads}: all must be positive (warmup may be 0)",
                            fix="e.g. --prompt-tokens 256 --new-tokens 64 --trials 5 --threads 1")
    if runtime not in ("auto", "packed", "dense"):
        raise LmshrinkError(f"runtime={runtime!r} is not known", fix="use auto, packed or dense")
    if decode not in DECODE_PATHS:
        raise LmshrinkError(f"decode={decode!r} is not known", fix="use one of " + ", ".join(DECODE_PATHS))
    runtimes = [_runtime_for(source, runtime) for source in models]
    for source, chosen in zip(models, runtimes):
        if chosen == "packed":
            if not (os.path.isdir(source) and is_compressed_tensors_folder(source)):
                raise LmshrinkError(f"{source} is not a compressed checkpoint folder, so it cannot run packed",
                                    fix="use --runtime auto (dense for uncompressed models) or a folder written "
                                        "by lmshrink compress")
    workers: list[_Worker] = []
    rows: list[dict[str, Any]] = []
    prompt: dict[str, Any] = {}  # the first row's prompt ids, given to the llama.cpp rows
    prompts: dict[str, dict[str, Any]] = {}  # each model's prompt ids, given to its fast row
    paths = PATHS_OF.get(decode, [decode])
    jobs = [(source, chosen, path) for source, chosen in zip(models, runtimes) for path in paths]
    jobs += [(path, LLAMA_CPP, LLAMA_CPP) for path in llama_cpp]
    fast_skipped: dict[str, str] = {}
    try:
        for source, chosen, path in jobs:
            spec = dict(source=source, runtime=chosen, dtype=dtype, threads=threads,
                        prompt_tokens=prompt_tokens, new_tokens=new_tokens, seed=seed, decode=path,
                        **(prompt if chosen == LLAMA_CPP else prompts.get(source, {})))
            worker = _Worker(spec)
            info = worker.read(f"loading {source}")
            if "error" in info:
                worker.close()
                if path != "hf" and decode in PATHS_OF and info.get("unsupported"):
                    # its hf row stays; the record says why there is no fast (or fast-q8) one
                    fast_skipped[source if path == "fast" else f"{source} ({path})"] = info["error"]
                    if progress:
                        print(f"bench: no {path} row for {source}: {info['error']}", file=sys.stderr)
                    continue
                raise LmshrinkError(f"{source}: {info['error']}", fix=info.get("fix"))
            workers.append(worker)
            ids = info.pop("prompt_ids")
            prompt = prompt or {"prompt_ids": ids, "prompt_source": info["prompt_source"]}
            prompts.setdefault(source, {"prompt_ids": ids, "prompt_source": info["prompt_source"]})
            rows.append({"source": source, "runtime": spec["runtime"], **info, "trials": []})
            if progress:
                print(f"bench: loaded {source} ({spec['runtime']}, decode {info['decode']}) in "
                      f"{info['load_seconds']:.1f}s", file=sys.stderr)
        for number in range(warmup + trials):
            for worker, row in zip(workers, rows):
                result = worker.ask("trial")
                if number >= warmup:
                    row["trials"].append(result)
            if progress:
                label = "warm-up" if number < warmup else f"trial {number - warmup + 1}/{trials}"
                print(f"bench: {label} done", file=sys.stderr)
        for worker, row in zip(workers, rows):
            row.update(worker.ask("finish"))
    finally:
        for worker in workers:
            worker.close()
    base_tokens = rows[0]["trials"][0]["tokens"]
    for row in rows:
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_cpu_tokens_per_s"):
            row[key] = statistics.median(t[key] for t in row["trials"])
        tokens = row["trials"][0]["tokens"]
        row["tokens"] = tokens
        row["same_greedy_prefix_as_first"] = next(
            (i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), len(tokens))
        for t in row["trials"]:
            t.pop("tokens")
    _compare(rows)
    protocol = {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "trials": trials, "warmup_trials": warmup,
        "threads": threads, "dtype": dtype, "seed": seed, "prompt": f"{rows[0]['prompt_source']}, batch 1",
        "decoding": "greedy, KV cache, one token per forward pass",
        "decode_paths": {"hf": "transformers' forward with its own cache (logits_to_keep=1)",
                         "fast": "lmshrink FastDecoder: the model's modules and weights, its own forward, a "
                                 "preallocated cache; q/k/v and gate/up fused for int4_avx2 layers",
                         "fast-q8": "FastDecoder with llama.cpp's approximations: the int4 layers' inputs rounded "
                                    "to int8 per block of 32 (activations='int8'), lm_head from a q8_0 copy "
                                    "(head='int8'); their accuracy cost: bench/decode_error.py"},
        "decode_cpu": "process CPU time of the decode loop (all threads), beside its wall time",
        **({"fast_skipped": fast_skipped} if fast_skipped else {}),
        "statistic": "median over trials; trials interleaved across models, one worker process per model",
        "kernel_max_rows": dict(KERNEL_MAX_ROWS),
        **({"llama_cpp": "llama-cpp-python " + rows[-1]["model"]["llama_cpp_python"] + ": n_threads and "
                         "n_threads_batch = threads, the prompt in one eval call, the argmax of the last position's "
                         "logits; the GGUF is memory-mapped (its RSS counts the pages read)"} if llama_cpp else {}),
        "machine": {"cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "torch": torch.__version__},
    }
    return {"protocol": protocol, "models": rows}


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
