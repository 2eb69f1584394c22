"""`omni-batch adapters validate DIR`: check an adapter against a model before any job needs it.

`register` imports nothing heavy: the CLI lists this command even without the worker extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter

from omni_engine.defaults import DEFAULT_MAX_LORA_RANK
from omni_engine.models.presets import DEFAULT_MODEL
from producer.cli import EXIT_OK, EXIT_USAGE
from producer.settings import ENV_MODEL, read_environment


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `adapters` command (entry point `omni_batch.commands:adapters`)."""
    adapters = subparsers.add_parser("adapters", help="inspect LoRA adapters")
    commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    validate = commands.add_parser("validate", help="check an adapter against a model, print what it targets")
    validate.add_argument(
        "directory", help="the adapter directory, or its weights file (PEFT, diffusers or kohya layout)"
    )
    validate.add_argument(
        "--model",
        default=None,
        help=f"model id, directory or preset (default: ${ENV_MODEL} or {DEFAULT_MODEL})",
    )
    validate.add_argument(
        "--max-lora-rank",
        type=int,
        default=DEFAULT_MAX_LORA_RANK,
        help=f"the highest rank allowed (default: {DEFAULT_MAX_LORA_RANK}, as Omni's)",
    )
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(handler=validate_command)


def validate_command(args: argparse.Namespace) -> int:
    import torch

    from omni_engine.errors import AdapterError, ModelError
    from omni_engine.lora.adapter import read_adapter
    from omni_engine.lora.layers import adaptable_layers, check_compatible
    from omni_engine.models.loader import load_model, quiet_library_output

    quiet_library_output()
    model_id = args.model or read_environment().model or DEFAULT_MODEL
    name = os.path.basename(os.path.normpath(args.directory)) or args.directory
    try:
        model = load_model(model_id, device=torch.device("cpu"), dtype=torch.float32)
        adapter = read_adapter(
            args.directory, name=name, component=model.denoiser_name, roots=None, converter=model.converter
        )
        check_compatible(adapter, adaptable_layers(model.denoiser), max_rank=args.max_lora_rank)
    except (AdapterError, ModelError) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return EXIT_USAGE

    # "transformer_blocks.3.attn.to_q" -> "attn.to_q": what kind of layer, not which block.
    kinds = Counter(re.sub(r"^.*\.\d+\.", "", module) for module in adapter.modules)
    report = {
        "adapter": str(adapter.path),
        "model": model_id,
        "sha256": adapter.sha256,
        "bytes": adapter.nbytes,
        "rank": adapter.max_rank,
        "lora_alpha": adapter.config.lora_alpha,
        "use_rslora": adapter.config.use_rslora,
        "layers": len(adapter.modules),
        "targets": dict(sorted(kinds.items())),
        "notes": list(adapter.notes),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"ok: {report['adapter']} fits {model_id}")
        print(f"  sha256 {adapter.sha256}, {adapter.nbytes} bytes")
        print(
            f"  rank {adapter.max_rank}, lora_alpha {adapter.config.lora_alpha:g}, "
            f"rslora {adapter.config.use_rslora}"
        )
        print(
            f"  {len(adapter.modules)} layers: "
            + ", ".join(f"{k} x{v}" for k, v in report["targets"].items())
        )
        for note in adapter.notes:
            print(f"  note: {note}")
    return EXIT_OK
