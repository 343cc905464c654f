"""The dense half of a decoder, run layer by layer on a flat batch of tokens with attention delegated.

The weights are the loaded transformers module's own (its norm, activation and rotary modules are called as
they are, its Linear layers through `dense.DenseForms`), so the dense arithmetic is the reference's up to the
order of summation; attention and the KV cache are the engine's.
Llama, Mistral and Qwen2 share one layout (pre-norm, rotary, gated MLP; Qwen2 with Q/K/V biases); OPT has
learned positions (offset 2), LayerNorm, a plain MLP and Q pre-scaled by 1/sqrt(head_dim)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from l3.engine.dense import DenseForms
from l3.engine.link import HostLink

# attention(layer, q (T, H, E), k (T, KVH, E), v (T, KVH, E)) -> (T, H, E): the engine's backend stores k, v
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Interleaved(NamedTuple):
    """What `DecoderRunner.forward_pair` gives per sub-batch: logits (float32) at its `last` rows, seconds of
    dense-device work, seconds of attention (host clock)."""

    logits: tuple[torch.Tensor, torch.Tensor]
    dense_s: tuple[float, float]
    attention_s: tuple[float, float]


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of x (T, heads, E), x cos + rotate_half(x) sin, bit for bit in fewer
    operations: rotate_half(x) = (-x2, x1) for x = (x1, x2), so rotate_half(x) sin = (x2, x1) (-sin1, sin2), the
    same products (a sign moved between exact factors), and (x2, x1) is x rolled by half its width. cos and
    signed_sin = (-sin1, sin2) are (T, 1, E)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class DecoderRunner:
    def __init__(self, hf, family: str, packed: dict | None = None):
        """`packed`: module name -> its weight in GGUF blocks (`LoadedModel.packed`), for the dense forms."""
        self.hf, self.family = hf, family
        cfg = hf.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.n_layers = cfg.num_hidden_layers
        self.opt = family == "opt"
        self.decoder = hf.model.decoder if self.opt else hf.model
        self.layers = self.decoder.layers
        # OPT folds 1/sqrt(head_dim) into Q; the others scale the scores
        self.scale = 1.0 if self.opt else self.head_dim**-0.5
        self.window = getattr(cfg, "sliding_window", None) if family == "mistral" else None
        modules = dict(hf.named_modules())
        self.dense = DenseForms((m for m in modules.values() if isinstance(m, torch.nn.Linear)),
                                {modules[name]: w for name, w in (packed or {}).items()})  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention,
                last: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Logits (float32) at the rows `last` of a flat batch of `tokens` at `positions`."""
        x, rope = self._embed(tokens, positions)
        for i, layer in enumerate(self.layers):
            x = self._post(layer, x, attention(i, *self._pre(layer, x, rope)))
        return self._head(x[last]).float()

    @torch.inference_mode()
    def forward_pair(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     attentions: Sequence[Attention], link: HostLink) -> Interleaved:  # fmt: skip
        """Two sub-batches ((tokens, positions, last) each, attended by `attentions[i]`) through the model
        interleaved as L3 runs them: each layer's attention of one sub-batch runs on the host while the dense
        device works through the other's layer (queued ahead of it: its dense work after the previous attention
        and before the next). On CUDA the two overlap; on a CPU the same order runs one step at a time, with the
        results of two `forward` calls."""
        xs, ropes, pending, marks = [], [], [], ([], [])
        attention_s = [0.0, 0.0]
        first = self.layers[0]
        for s, (tokens, positions, _) in enumerate(batches):
            m = link.mark()
            x, rope = self._embed(tokens, positions)
            pending.append(link.to_host(self._pre(first, x, rope)))
            marks[s].append((m, link.mark()))
            xs.append(x)
            ropes.append(rope)
        for i, layer in enumerate(self.layers):
            for s in (0, 1):
                q, k, v = link.wait(pending[s])
                t = time.perf_counter()
                out = link.to_device(attentions[s](i, q, k, v))
                attention_s[s] += time.perf_counter() - t
                m = link.mark()
                xs[s] = self._post(layer, xs[s], out)
                if i + 1 < len(self.layers):
                    pending[s] = link.to_host(self._pre(self.layers[i + 1], xs[s], ropes[s]))
                marks[s].append((m, link.mark()))
        logits = []
        for s, (_, _, last) in enumerate(batches):
            m = link.mark()
            logits.append(self._head(xs[s][last]).float())
            marks[s].append((m, link.mark()))
        link.finish()
        dense_s = tuple(sum(link.elapsed(a, b) for a, b in ms) for ms in marks)
        return Interleaved(tuple(logits), dense_s, tuple(attention_s))

    def _embed(self, tokens, positions):
        d = self.decoder
        x = d.embed_tokens(tokens)
        if self.opt:
            if d.project_in is not None:
                x = d.project_in(x)
            return x + d.embed_positions.weight[positions + d.embed_positions.offset], None
        cos, sin = d.rotary_emb(x[None], positions[None])
        half = cos.shape[-1] // 2
        signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # once a step, for `rotary`
        return x, (cos[0, :, None], signed[:, None])

    def _qkv(self, attn, h, rope):
        t = h.shape[0]
        q = self.dense.linear(attn.q_proj, h).view(t, self.n_heads, self.head_dim)
        k = self.dense.linear(attn.k_proj, h).view(t, self.n_kv_heads, self.head_dim)
        v = self.dense.linear(attn.v_proj, h).view(t, self.n_kv_heads, self.head_dim)
        if self.opt:
            return q * attn.scaling, k, v
        return rotary(q, *rope), rotary(k, *rope), v

    def _pre(self, layer, x, rope):
        """The layer's Q, K, V from the residual stream x."""
        if self.opt:
            h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
        else:
            h = layer.input_layernorm(x)
        return self._qkv(layer.self_attn, h, rope)

    def _post(self, layer, x, a):
        """The residual stream after the layer, from x and the layer's attention output a (T, H, E)."""
        a = a.reshape(x.shape[0], -1)
        if self.opt:
            x = x + self.dense.linear(layer.self_attn.out_proj, a)
            if not layer.do_layer_norm_before:
                x = layer.self_attn_layer_norm(x)
            h = layer.final_layer_norm(x) if layer.do_layer_norm_before else x
            x = x + self.dense.linear(layer.fc2, layer.activation_fn(self.dense.linear(layer.fc1, h)))
            return x if layer.do_layer_norm_before else layer.final_layer_norm(x)
        x = x + self.dense.linear(layer.self_attn.o_proj, a)
        mlp, h = layer.mlp, layer.post_attention_layernorm(x)  # the gated MLP of Llama, Mistral and Qwen2
        gate, up = self.dense.linear(mlp.gate_proj, h), self.dense.linear(mlp.up_proj, h)
        return x + self.dense.linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def _head(self, x):
        d = self.decoder
        if self.opt:
            if d.final_layer_norm is not None:
                x = d.final_layer_norm(x)
            if d.project_out is not None:
                x = d.project_out(x)
        else:
            x = d.norm(x)
        return self.dense.linear(self.hf.lm_head, x)
