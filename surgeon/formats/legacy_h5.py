"""Legacy Keras H5 (Keras 2.x, tf.keras, Keras 3's legacy writer): reader and lossless writer.

Full-model files keep the weights under ``model_weights/`` and the optimizer under
``optimizer_weights/``, with ``model_config`` / ``training_config`` JSON root attrs;
weights-only files put the layer groups at the root. The order of layers and weights is
the ``layer_names`` / ``weight_names`` attrs (split into ``layer_names0..N`` when large),
never h5py's iteration order. Canonical names follow the Keras 3 tree: ``<layer>/<var>``
with the ``:0`` suffix and the file's variable scope removed (``conv2d_1_1/kernel:0`` in
layer ``conv2d_1`` -> ``conv2d_1/kernel``; an LSTM's weights get the Keras 3 cell scope,
``lstm_1/lstm_cell/kernel``).
"""
from __future__ import annotations

import json

import numpy as np

from surgeon.binding import layers, legacy as legacy_binding
from surgeon.core.errors import FormatError
from surgeon.core.tree import Entry, OptimizerInfo, slot_name
from .h5tree import DS, Node
from .keras_h5 import KerasH5Reader, KerasH5Writer, open_h5, read_model_json

CELLS = {"LSTM": "lstm_cell", "GRU": "gru_cell", "SimpleRNN": "simple_rnn_cell",
         "ConvLSTM1D": "conv_lstm_cell", "ConvLSTM2D": "conv_lstm_cell",
         "ConvLSTM3D": "conv_lstm_cell"}
CELL_CLASSES = {"LSTM": "LSTMCell", "GRU": "GRUCell", "SimpleRNN": "SimpleRNNCell"}
STATE_VARS = {"moving_mean", "moving_variance"}


def _text(v) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8")
    return str(v)


def split_attr(node: Node, name: str, label: str) -> list:
    """An attr list that Keras may have split into ``name0``, ``name1``, ...; numeric order."""
    if name in node.attrs:
        values = node.attrs[name]
    else:
        chunks = sorted((int(k[len(name):]), k) for k in node.attrs
                        if k.startswith(name) and k[len(name):].isdigit())
        if not chunks:
            return []
        values = [v for _, k in chunks for v in np.atleast_1d(node.attrs[k])]
    try:
        arr = np.atleast_1d(values)
        if arr.size and arr.dtype.kind == "f":  # Keras writes empty lists as float64 []
            raise ValueError("numbers instead of names")
        return [_text(v) for v in arr]
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{label}: corrupt attr {name!r} on /{node.path}: {exc}") from None


def _json_attr(root: Node, name: str, label: str):
    raw = root.attrs.get(name)
    if raw is None:
        return None
    try:
        return json.loads(_text(raw))
    except ValueError as exc:
        raise FormatError(f"{label}: root attr {name!r} is not valid JSON: {exc}") from None


def model_layers(model_config) -> list:
    """[(name, class_name, config)] of a model config (Keras 2.0 list or dict form)."""
    if not isinstance(model_config, dict):
        return []
    cfg = model_config.get("config")
    items = cfg if isinstance(cfg, list) else (cfg or {}).get("layers", [])
    out = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        c = item.get("config") or {}
        out.append((c.get("name", item.get("name")), item.get("class_name"), c))
    return out


def canonical_name(layer, cls, wname, cfg=None) -> tuple:
    """(canonical name, path below the layer) of weight ``wname`` of ``layer``."""
    parts = legacy_binding.strip_suffix(wname).split("/")
    if layer in parts[:-1]:
        rest = parts[parts.index(layer) + 1:]
    elif cls in layers.MODEL_CLASSES or len(parts) == 1:
        rest = parts
    else:
        rest = parts[1:]
    if cls in CELLS and len(rest) == 1:
        rest = [CELLS[cls]] + rest
    wrapped = ((cfg or {}).get("layer") or {}).get("class_name")
    if cls == "Bidirectional" and wrapped in CELLS and len(rest) == 2:
        rest = [rest[0], CELLS[wrapped], rest[1]]  # forward_lstm_1/kernel -> .../lstm_cell/kernel
    return "/".join([layer] + rest), rest


def _is_state(cls, cfg, rest) -> bool:
    """Is a weight (path ``rest`` below its layer) non-trainable by nature?"""
    if cls in layers.MODEL_CLASSES and len(rest) > 1:
        inner = {n: (c, k) for n, c, k in model_layers({"config": cfg or {}})}
        icls, icfg = inner.get(rest[0], (None, None))
        return _is_state(icls, icfg, rest[1:])
    leaf = rest[-1]
    return leaf in STATE_VARS or leaf in dict(layers._NON_TRAINABLE).get(cls, ())


def _is_frozen(cls, cfg, rest) -> bool:
    if (cfg or {}).get("trainable", True) is False:
        return True
    if cls in layers.MODEL_CLASSES and len(rest) > 1:
        inner = {n: (c, k) for n, c, k in model_layers({"config": cfg or {}})}
        icls, icfg = inner.get(rest[0], (None, None))
        return _is_frozen(icls, icfg, rest[1:])
    return False


class LegacyH5Reader(KerasH5Reader):
    """Canonical view of a legacy Keras H5 file (full model or weights only)."""

    format = "legacy-h5"

    def _build(self, model_json):
        root, label = self._root, self.label
        self.keras_version = _text(root.attrs.get("keras_version", "")) or None
        own = _json_attr(root, "model_config", label)
        self._own_config = own is not None
        self.model_config = own or model_json
        self.training_config = _json_attr(root, "training_config", label)
        self.full_model = "model_weights" in root
        wroot = root["model_weights"] if self.full_model else root
        entries, params = self._layer_entries(wroot)
        oentries, self.optimizer, self.notes = self._optimizer_entries(params)
        self._index(entries + oentries)

    def _layer_entries(self, wroot):
        label = self.label
        names = split_attr(wroot, "layer_names", label)
        if not names and "layer_names" not in wroot.attrs:
            raise FormatError(f"{label}: no layer_names attr; not a legacy Keras H5 weights file")
        configs = {n: (c, k) for n, c, k in model_layers(self.model_config)}
        entries, params = [], []
        for layer in names:
            group = wroot.get(layer)
            if not isinstance(group, Node):
                raise FormatError(f"{label}: layer_names lists {layer!r} but there is no group "
                                  f"/{wroot.path + '/' if wroot.path else ''}{layer} (corrupt attrs)")
            cls, cfg = configs.get(layer, (None, None))
            for wname in split_attr(group, "weight_names", label):
                ds = group.get(wname)
                if not isinstance(ds, DS):
                    raise FormatError(f"{label}: weight_names of layer {layer!r} lists {wname!r} "
                                      "but the file has no such dataset (corrupt attrs)")
                name, rest = canonical_name(layer, cls, wname, cfg)
                state = _is_state(cls, cfg, rest)
                frozen = not state and _is_frozen(cls, cfg, rest)
                e = Entry(name, tuple(ds.shape), _dtype(ds), "state" if state else "param",
                          key=ds.path, layer=layer, frozen=frozen)
                entries.append(e)
                if not state and not frozen:
                    params.append(legacy_binding.Param(name, wname, e.shape))
        return entries, params

    def _optimizer_info(self):
        oc = (self.training_config or {}).get("optimizer_config") or {}
        cls = oc.get("class_name")
        if isinstance(cls, str):
            cls = cls.split(">")[-1]
        cfg = oc.get("config") or {}
        lr = cfg.get("learning_rate", cfg.get("lr"))
        info = OptimizerInfo(name=cfg.get("name") or cls or "optimizer", class_name=cls, config=cfg)
        if isinstance(lr, (int, float)):
            info.learning_rate = float(lr)
        return info

    def _optimizer_entries(self, params):
        info = self._optimizer_info() if self.training_config else None
        og = self._root.get("optimizer_weights")
        if not isinstance(og, Node):
            return [], info, []
        wnames = split_attr(og, "weight_names", self.label)
        weights = []
        for i, wname in enumerate(wnames):
            ds = og.get(wname)
            if not isinstance(ds, DS):
                raise FormatError(f"{self.label}: optimizer_weights lists {wname!r} but the file "
                                  "has no such dataset (corrupt attrs)")
            weights.append((legacy_binding.OptWeight(i, wname, tuple(ds.shape)), ds))
        info = info or OptimizerInfo(name="optimizer")
        b = legacy_binding.bind([w for w, _ in weights], params, info.class_name,
                                info.config, self.keras_version)
        self.binding = b
        return [self._opt_entry(w, ds, b, info) for w, ds in weights], info, b.notes

    def _opt_entry(self, w, ds, b, info):
        i = w.index
        if i in b.globals:
            g = b.globals[i]
            if g == "iteration":
                info.iterations = int(np.asarray(self._dataset(ds.path)[()]).reshape(-1)[0])
            elif g == "learning_rate":
                info.learning_rate = float(np.asarray(self._dataset(ds.path)[()]).reshape(-1)[0])
            return Entry(f"optimizer/{g}", w.shape, _dtype(ds), "optimizer", key=ds.path)
        if i in b.slots:
            p, s = b.slots[i]
            return Entry(slot_name(p, s), w.shape, _dtype(ds), "slot", slot_of=p, slot=s,
                         key=ds.path, layer=self._by_param_layer(p))
        if i in b.placeholders:
            return Entry(f"optimizer/placeholder/{i}", w.shape, _dtype(ds), "optimizer", key=ds.path)
        return Entry(f"optimizer/unresolved/{i}", w.shape, _dtype(ds), "slot", key=ds.path)

    def _by_param_layer(self, param):
        return param.split("/", 1)[0]

    def metadata(self):
        md = super().metadata()
        md["keras_version"] = self.keras_version
        md["full_model"] = self.full_model
        return md


def _dtype(ds) -> str:
    if ds.attrs.get("dtype", None) == "bfloat16":
        return "bfloat16"
    return str(ds.dtype)


def open_legacy_h5(path, model=None):
    """Open a legacy Keras H5 file; ``model`` (``.keras``/``config.json``) helps weights-only files."""
    reader = LegacyH5Reader(path, [open_h5(path, str(path))], read_model_json(model))
    if model is not None and reader.model_config is not None:
        from . import model_fit
        try:
            model_fit.check_legacy(reader, model)
        except BaseException:
            reader.close()
            raise
    return reader


class LegacyH5Writer(KerasH5Writer):
    """Lossless same-format writer: untouched datasets, groups and attrs copied as stored."""

    def __init__(self, like, target):
        super().__init__(like, [target])
