"""Sizes and FLOPs of a model: what ``asrshrink info``, the reports and the export metadata state about it."""

from __future__ import annotations

from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import ModelInfo
from asrshrink.models.layers import sparse_matrices, sparse_storage_bytes


def describe(model: Transducer, info: ModelInfo | None = None) -> dict:
    """Family, parameters and float32 bytes per component, and FLOPs (2 per multiply-add).

    Also the sizes with pruned matrices stored sparse: ``nonzero_params`` (parameters less the pruned zeros)
    and ``sparse_bytes`` (each pruned matrix as a bit mask plus its non-zeros, eq. 13 of the sparsity paper;
    every other parameter dense), per component and in total; both equal the dense figures without pruning."""
    components = model.components()
    params = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in components.items()}
    nbytes = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in components.items()}
    nonzero, sparse = {}, {}
    for name, component in components.items():
        nonzero[name], sparse[name] = params[name], nbytes[name]
        for module in component.modules():
            for w in sparse_matrices(module):
                kept = int(w.count_nonzero())
                nonzero[name] -= w.numel() - kept
                sparse[name] += sparse_storage_bytes(w.numel(), kept, w.element_size()) - w.numel() * w.element_size()
    data = {
        "family": model.family,
        "params": int(sum(params.values())),
        "params_by_component": params,
        "bytes": int(sum(nbytes.values())),
        "bytes_by_component": nbytes,
        "nonzero_params": int(sum(nonzero.values())),
        "nonzero_params_by_component": nonzero,
        "sparse_bytes": int(sum(sparse.values())),
        "sparse_bytes_by_component": sparse,
        "flops": {"encoder_per_frame": model.flops()["encoder"],
                  "prediction_per_label": model.flops()["prediction"],
                  "joint_per_evaluation": model.flops()["joint"]},
        "encoder_frame_seconds": model.feature_config.frame_shift_seconds * model.time_reduction,
        "flops_frames": model.flops_frames,
        "encoder_layers": [{"name": name, "params": sum(p.numel() for p in model.get_submodule(name).parameters()),
                            "flops_per_frame": flops} for name, flops in model.flops_by_layer().items()],
        "vocabulary": model.vocabulary.to_json(),
        "config": model.config_dict(),
    }
    if model.sharing is not None:  # parameters above count each shared tensor once (physical)
        data["sharing"] = {**model.sharing.summary(),
                           "virtual_params": sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)
                                                 if p.requires_grad)}
    if model.arbitrator is not None:
        data["amnet"] = amnet_summary(model)
    if info is not None:
        data.update(path=str(info.path), format=info.kind, sha256=info.sha256, source_sha256=info.source_sha256,
                    structure=info.structure)
    return data



def amnet_summary(model: Transducer) -> dict:
    """An AmNet's two branches (per layer: MF ranks or sparse masks' sparsities, slow / fast) and FLOPs per
    encoder frame on each, and its arbitrator (size, parameters, FLOPs per decision)."""
    from asrshrink.models.branched import BranchedLSTMLayer

    arb = model.arbitrator
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, BranchedLSTMLayer):
            row = {"name": name, "kind": module.kind}
            for side, cols in (("ih", module.input_size), ("hh", module.hidden_size)):
                if module.kind == "mf":
                    row[side] = {"shape": [4 * module.hidden_size, cols], "ranks": list(module.ranks[side])}
                else:
                    numel = 4 * module.hidden_size * cols
                    row[side] = {"shape": [4 * module.hidden_size, cols],
                                 "sparsity": [1 - module.nonzeros(side, n) / numel for n in range(module.branches)]}
            layers.append(row)
    return {"branches": ["slow", "fast"], "branch_flops_per_frame": model.branch_flops(),
            "arbitrator": {"hidden_size": arb.hidden_size, "num_layers": arb.num_layers, "feedback": arb.feedback,
                           "input_size": arb.input_size, "params": sum(p.numel() for p in arb.parameters()),
                           "flops_per_frame": arb.flops_per_step()},
            "layers": layers}
