"""What each layer does to the image's size and what it costs: the study's `(W - F + 2P) / S + 1`, checked
against a real forward (hooks record every layer's actual input and output), with parameters and MACs.

Written per run as layers.md; the study's stride and kernel tables take their feature-map size and MACs
from `layer_table` too, so both always agree with the net that was trained."""
import torch
from torch import nn

SIZED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear)


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def formula_size(width, kernel, stride, padding):
    """The study's output side: floor((W - F + 2P) / S) + 1."""
    return (width - kernel + 2 * padding) // stride + 1


def layer_table(model, res):
    """One row per conv, pool and linear layer, in forward order, for one res x res RGB image:
    name, kind, kernel, stride, padding, input and output shape (C, H, W) of the real forward, the output side
    by the formula (None where no formula applies), parameters and MACs (multiply-accumulates)."""
    rows, hooks = [], []

    def record(name):
        def hook(module, inputs, output):
            rows.append((name, module, tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, SIZED):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, res, res, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [_row(name, module, shape_in, shape_out) for name, module, shape_in, shape_out in rows]


def _row(name, module, shape_in, shape_out):
    row = {"name": name, "kind": type(module).__name__, "kernel": None, "stride": None, "padding": None,
           "input": shape_in, "output": shape_out, "formula": None,
           "params": sum(p.numel() for p in module.parameters(recurse=False)), "macs": 0}
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        row.update(kernel=k[0], stride=s[0], padding=p[0],
                   formula=formula_size(shape_in[-1], k[1], s[1], p[1]))
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size
        row["macs"] = shape_out[0] * shape_out[1] * shape_out[2] * (shape_in[0] // module.groups) * k[0] * k[1]
    elif isinstance(module, nn.Linear):
        row["macs"] = module.in_features * module.out_features
    return row


def feature_map(rows):
    """The last conv layer's output (C, H, W): what the feature extractor hands to the head."""
    convs = [r for r in rows if r["kind"] == "Conv2d"]
    return convs[-1]["output"] if convs else None


def layers_markdown(rows, title):
    """layers.md: the table, a total, and a line saying whether every formula matched the real forward."""
    shape = lambda s: " x ".join(map(str, s))  # noqa: E731
    lines = [f"# {title}", "", "| layer | kind | kernel | stride | padding | input | output | "
             "(W - F + 2P) / S + 1 | parameters | MACs |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['kernel'] or ''} | {r['stride'] or ''} | "
                     f"{'' if r['padding'] is None else r['padding']} | {shape(r['input'])} | {shape(r['output'])} | "
                     f"{'' if r['formula'] is None else r['formula']} | {r['params']:,} | {r['macs']:,} |")
    lines.append(f"| total | | | | | | | | {sum(r['params'] for r in rows):,} | {sum(r['macs'] for r in rows):,} |")
    wrong = [r["name"] for r in rows if r["formula"] is not None and r["formula"] != r["output"][-1]]
    lines += ["", f"The formula's output side differs from the real forward at: {', '.join(wrong)}." if wrong else
              "Every formula output side equals the real forward's. MACs count one image; pools and "
              "activations cost none here."]
    return "\n".join(lines) + "\n"
