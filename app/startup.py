"""Start-up: assemble the service from a built ladder (device, ladder, chat template, meter,
router seeded by a calibration run on this host, executor), refusing to start when the worst
case of memory cannot fit. Blocking: the lifespan runs it off the event loop."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from app.lane_reports import ServiceObserver
from app.service import GenerationService
from app.settings import Settings
from models.runtime.calibrate import CALIBRATION_PROMPT, calibrate, measure_step_widths
from models.runtime.chat import TOKENIZER_CONFIG, ChatTemplate
from models.runtime.host import cpu_name, isa_flags
from models.runtime.ladder import LoadedLadder, load_ladder
from routing.cost import CostModel
from routing.router import Router
from serving.executor import Executor, ExecutorConfig
from telemetry.base import EnergyMeter
from telemetry.factory import MeterConfig, create_meter
from telemetry.metrics import Metrics
from telemetry.power import LivePower
from telemetry.sampler import DeviceSampler

log = logging.getLogger("greenroute")


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\][^\s/\\:'\"]+)+[/\\]?")


def redact_paths(message: str) -> str:
    """``message`` with every absolute path cut to its last part (``…/ladder``): the reason
    stays actionable and a caller of ``/ready`` learns nothing of the file system."""
    return _PATH.sub(lambda m: "…/" + re.split(r"[/\\]", m.group().rstrip("/\\"))[-1],
                     message)


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when onnxruntime's CUDA provider is present, else ``cpu``."""
    if requested != "auto":
        return requested
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def build_service(settings: Settings, registry: CollectorRegistry) -> GenerationService:
    """Load the ladder and its chat template, assemble lanes, meter and metrics (blocking; run
    off the loop)."""
    device = resolve_device(settings.device)
    chat_template = load_chat_template(settings.ladder_dir)  # before the slow part: fail fast
    ladder = load_ladder(settings.ladder_dir, device=device, threads=settings.threads,
                         runtime=settings.runtime, only=settings.variants or None,
                         variant_threads=settings.variant_threads,  # None: the manifest's
                         wide_from_rows=settings.wide_from_rows)
    if not ladder.engines:
        raise RuntimeError(f"no variant could be loaded from {settings.ladder_dir}: "
                           f"{ladder.failed}")
    metrics = Metrics(registry, ladder.manifest.variants, [device])
    for v in ladder.manifest.variants.values():
        metrics.quality.labels(v.name).set(v.quality)
    meter = create_meter(meter_config(settings, device))
    speculative = {v.name for v in ladder.manifest.variants.values() if v.speculative}
    router = Router({v.name: v.quality for v in ladder.manifest.variants.values()},
                    seed_costs(ladder, meter, settings.max_batch),
                    reference=ladder.manifest.reference(),
                    on_infeasible=settings.on_infeasible, speculative=speculative,
                    speculate_below_rows=settings.speculate_below_rows)
    config = ExecutorConfig(
        max_batch=settings.max_batch, max_seq_tokens=settings.max_seq_tokens,
        queue_size=settings.queue_size, prefill_token_budget=settings.prefill_token_budget,
        # a counter that moves every 20-100 ms is read no more often than it moves
        ledger_interval_s=settings.nvml_counter_period_s if meter.source == "nvml" else 0.0,
        power_cap_watts=settings.power_cap_watts, power_window_s=settings.power_window_s)
    power = LivePower(meter, settings.power_window_s)
    executor = Executor(ladder.engines, list(ladder.manifest.variants), router, meter, device,
                        config, ServiceObserver(metrics, device), power=power.watts)
    try:
        check_memory(executor, ladder, settings)
    except RuntimeError:
        executor.stop(0)
        ladder.close()
        raise
    log.info("ladder loaded from %s: %s (failed: %s) on %s; %s chat template",
             settings.ladder_dir, sorted(ladder.engines), ladder.failed or "none", device,
             chat_template.source)
    metrics.meter_opened(meter.device, meter.source)
    power.observe(meter.total_joules())  # its window starts after the start-up calibration

    def on_sample(watts: float, joules: float) -> None:
        metrics.device_sample(meter.device, meter.source, watts, joules)
        power.observe(meter.total_joules())

    sampler = DeviceSampler(meter, on_sample, settings.device_sample_period_s)
    service = GenerationService(ladder, executor, meter, metrics, settings, device, router,
                                chat_template, power, sampler)
    return service


CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
WEIGHTS_RESIDENT = 1.5  # resident memory per byte of ONNX weights (arenas, prepacked copies:
# the SmolLM2 ladder's 1.3 GB of graphs take ~1.8 GiB resident in the image)


def memory_limit(settings: Settings, cgroup: Path = CGROUP_MEMORY_MAX) -> tuple[int, str]:
    """The memory the service must fit in, and where that number came from."""
    if settings.memory_limit_bytes:
        return settings.memory_limit_bytes, "GREENROUTE_MEMORY_LIMIT_BYTES"
    try:
        text = cgroup.read_text().strip()
        if text.isdigit():
            return int(text), "the container's cgroup limit"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def check_memory(executor: Executor, ladder: LoadedLadder, settings: Settings) -> None:
    """Refuse to start when the worst case cannot fit: every variant's KV rows full (the
    speculative rung's own rows included) plus the weights. KV pages are touched only as rows
    fill, so without this a service starts fine and is OOM-killed under long requests."""
    kv = {name: capacity for name, (capacity, _) in executor.kv_bytes().items()}
    weights = sum(v.bytes * (2 if ladder.engines[v.name].wide_threads else 1)
                  for v in ladder.manifest.variants.values()
                  if v.name in ladder.engines and not v.speculative)  # a wide session: twice
    need = sum(kv.values()) + WEIGHTS_RESIDENT * weights
    limit, source = memory_limit(settings)
    if need > limit:
        gib = 2**30
        per = ", ".join(f"{n} {b / gib:.2f}" for n, b in kv.items() if b)
        raise RuntimeError(
            f"the worst case does not fit in memory: KV cache {sum(kv.values()) / gib:.1f} GiB "
            f"({per}; {settings.max_batch} rows x {settings.max_seq_tokens} tokens each) + "
            f"weights ~{WEIGHTS_RESIDENT * weights / gib:.1f} GiB > {limit / gib:.1f} GiB "
            f"({source}); lower GREENROUTE_MAX_BATCH or GREENROUTE_MAX_SEQ_TOKENS, load fewer "
            "variants (GREENROUTE_VARIANTS), or raise the limit")


def load_chat_template(ladder_dir: Path) -> ChatTemplate:
    """The ladder's chat template, rendered once on a one-message probe so that a broken
    template stops start-up (reported by ``/ready``) instead of failing every chat request."""
    try:
        template = ChatTemplate.for_directory(ladder_dir)
    except json.JSONDecodeError as err:
        raise RuntimeError(f"{ladder_dir / TOKENIZER_CONFIG} is not valid JSON: "
                           f"{err}") from err
    try:
        template.render([{"role": "user", "content": "Hello"}])
    except ValueError:
        pass  # the template refused this conversation on purpose (raise_exception): it compiles
    except Exception as err:  # jinja2's syntax and runtime errors
        raise RuntimeError(f"the {template.source} chat template in {ladder_dir} cannot "
                           f"be rendered: {err}") from err
    return template


def meter_config(settings: Settings, device: str) -> MeterConfig:
    return MeterConfig(settings.energy_meter, device, settings.gpu_index,
                       settings.cuda_visible_devices, settings.nvml_sample_hz,
                       settings.nvml_counter_period_s, settings.rapl_root,
                       settings.estimate_watts_per_core, settings.estimate_idle_watts)


def seed_costs(ladder: LoadedLadder, meter: EnergyMeter,
               max_batch: int = 16) -> dict[str, CostModel]:
    """Start-up calibration: a short measured run per loaded variant gives its watts (and its
    per-token times when this host is not the one the manifest was calibrated on), and its
    step time and power at a few batch widths seed the router's step and power tables."""
    host_matches = (ladder.manifest.host.get("processor") == cpu_name()
                    and ladder.manifest.host.get("cpu_count") == os.cpu_count()
                    and ladder.manifest.host.get("isa", isa_flags()) == isa_flags())
    costs: dict[str, CostModel] = {}
    for name, engine in ladder.engines.items():
        prompt = engine.encode(CALIBRATION_PROMPT)
        mark = meter.begin()
        measured = calibrate(engine, prompt, new_tokens=16, repeats=1)
        reading = meter.end(mark)
        cal = ladder.manifest.variants[name].calibration
        threads = engine.threads  # our engine's; genai's runs its own way (None)
        if (not host_matches or cal is None
                or (threads is not None and cal.threads != threads)):
            cal = measured
        widths = measure_step_widths(engine, prompt, max_batch=max_batch, meter=meter)
        costs[name] = CostModel(cal.prefill_ms_per_token, cal.decode_ms_per_token,
                                watts=max(reading.avg_watts, 1e-3),
                                # rows that share no forward cost a whole step each
                                step_ms_per_row=cal.decode_ms_per_token,
                                widths=widths.ms if widths else None,
                                watts_widths={w: max(x, 1e-3) for w, x in widths.watts.items()}
                                if widths else None,
                                prefill_watts=max(reading.avg_watts, 1e-3),
                                max_rows=max_batch)
    return costs
