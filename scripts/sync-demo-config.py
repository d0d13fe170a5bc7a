#!/usr/bin/env python3
"""Copies envoy/demo-filter.json into the places that inline it (envoy/demo.yaml's
`configuration.value` block, envoy/demo-native.yaml's `filter_config.value` block and
envoy/istio-wasmplugin.yaml's `pluginConfig`).
A test (tests/foundation.rs) fails when they drift; run this after editing the JSON."""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "envoy"
cfg = json.loads((root / "demo-filter.json").read_text())
text = json.dumps(cfg, indent=2)

# demo.yaml and demo-native.yaml: replace the block scalar after `value: |`.
for name in ("demo.yaml", "demo-native.yaml"):
    p = root / name
    lines = p.read_text().split("\n")
    i = next(n for n, l in enumerate(lines) if l.rstrip().endswith("value: |"))
    indent = len(lines[i]) - len(lines[i].lstrip())
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    block = [" " * (indent + 2) + l for l in text.split("\n")]
    p.write_text("\n".join(lines[: i + 1] + block + lines[j:]))

# istio-wasmplugin.yaml: pluginConfig is the last key, written as JSON.
p = root / "istio-wasmplugin.yaml"
s = p.read_text()
head = s[: s.index("  pluginConfig:")]
p.write_text(head + "  pluginConfig:\n" + "\n".join("    " + l for l in text.split("\n")) + "\n")
print("synced envoy/demo.yaml, envoy/demo-native.yaml and envoy/istio-wasmplugin.yaml from envoy/demo-filter.json")
