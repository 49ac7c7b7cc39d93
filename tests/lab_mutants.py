"""Plausible wrong solutions of every lab exercise, to prove the checks reject them.

``MUTANTS[lab][n]`` lists the mutants of exercise ``n`` (1-based) of ``labs/LAB.md``.
A mutant is an edit ``(old, new)`` of the exercise cell: ``old`` must occur exactly
once, inside a solution region, and is replaced by ``new``. Each is a mistake a learner
makes: a missing scale, an off-by-one mask, a wrong reduction or axis, a forgotten term.
``tests/test_lab_mutants.py`` applies each and asserts that the exercise's checks fail.
"""

MUTANTS = {
    "01-memory-budget": {
        1: [("+ cfg.block_size * C", ""),                     # no position table
            ("(cfg.n_layer * per_block", "((cfg.n_layer - 1) * per_block"),
            ("\n            + final_norm)", ")")],             # final norm forgotten
        2: [('"optimizer": 2 * weights', '"optimizer": weights'),   # one moment
            ("p.numel() * p.element_size()", "p.numel() * 4")],     # assumes fp32
        3: [("math.ceil", "math.floor"),
            ("(fraction * gpu_bytes)", "gpu_bytes"),
            ("ceil(16 * n_params", "ceil(12 * n_params")],
    },
    "02-attention": {
        1: [(" / math.sqrt(q.shape[-1])", ""),                   # missing scale
            ("masked_fill(~mask", "masked_fill(mask"),           # mask inverted
            ("softmax(scores, dim=-1)", "softmax(scores, dim=-2)")],
        2: [("tril()", "tril(-1)"),                              # off by one
            ("tril()", "triu()")],
        3: [("x.view(B, T, n_heads, C // n_heads).transpose(1, 2)",
             "x.view(B, n_heads, T, C // n_heads)"),            # view, no transpose
            ("x.transpose(1, 2).reshape(B, T, nh * hs)", "x.reshape(B, T, nh * hs)"),
            ("x.view(B, T, n_heads, C // n_heads)",
             "x.view(B, T, C // n_heads, n_heads).transpose(-1, -2)")],
        4: [("merge_heads(attention(q, k, v, mask)) @ w_o.T",
             "merge_heads(attention(q, k, v, mask))"),           # no output projection
            ("x @ w_q.T", "x @ w_q"),
            ("attention(q, k, v, mask)", "attention(q, k, v)")],  # mask dropped
    },
    "03-low-precision": {
        1: [("p.grad.mul_(1.0 / scale)", "p.grad.mul_(scale)"),
            ("return scale * growth_factor, 0",
             "return scale * growth_factor, clean_steps"),
            ("if clean_steps == growth_interval:", "if clean_steps > growth_interval:"),
            ("return scale * backoff_factor, 0",
             "return scale * backoff_factor, clean_steps")],
        2: [("scale = fmax / x.abs().max().float().clamp(min=1e-12)",
             "scale = x.abs().max().float().clamp(min=1e-12) / fmax"),
            ("return x_fp8.float() / scale", "return x_fp8.float() * scale"),
            ("fmax = torch.finfo(dtype).max", "fmax = 448.0")],
        3: [("(amax / 127)", "(amax / 128)"),
            ("amax = w.abs().amax(dim=dims, keepdim=True).float()",
             "amax = w.abs().max().float().reshape([1] * w.dim())"),   # per tensor
            ("torch.round(w.float() * (1.0 / scale))",
             "(w.float() * (1.0 / scale)).trunc()")],
        4: [("torch.randint(0, 1 << 16", "torch.randint(0, 1 << 15"),   # biased down
            ("((bits + noise) & -65536)", "(bits & -65536)"),   # truncation, no noise
            ("((bits + noise) & -65536).view(torch.float32)",
             "(bits + noise).view(torch.float32)")],  # noise, then round to nearest
        5: [("y = update.to(w.dtype) - comp", "y = update.to(w.dtype) + comp"),
            ("comp.copy_((t - w) - y)", "comp.copy_(y - (t - w))"),   # sign flipped
            ("t = w + y", "t = w.float() + y.float()")],   # fp32 sum: no error seen
        6: [("not torch.isfinite(output).all()", "torch.isinf(output).any()"),  # NaN
            ("return found[0] if found", "return found[-1] if found"),   # the last
            ("            h.remove()\n", "            pass\n")],          # hooks stay
        7: [("torch.exp2((e - 1 - 2).double())", "torch.exp2((e - 2).double())"),
            ("torch.round(y / spacing)", "torch.floor(y / spacing + 0.5)"),  # ties up
            (".clamp(max=6.0)", ""),                        # 7 becomes 8: no saturation
            ("torch.where(y < 4, 1.0, 2.0)", "torch.where(y < 4, 1.0, 1.0)")],
    },
    "04-parallel": {
        1: [("p.grad /= world", "pass"),                         # a sum, not a mean
            ("p.grad /= world", "p.grad /= 2 * world")],
        2: [("torch.cat(parts, dim=-1)", "torch.cat(parts, dim=0)"),
            ("y = F.linear(x_part, weight)", "y = F.linear(x_part, weight, bias)")],
        3: [("acc = grad + error", "acc = grad"),                # no error feedback
            ("acc.abs().topk(k)", "acc.topk(k)"),         # largest, not magnitude
            ("new_error[indices] = 0", "pass")],
        4: [("chunks[recv].add_(buf)", "chunks[recv].copy_(buf)"),   # no reduction
            ("send, recv = (rank - step + 1) % world, (rank - step) % world",
             "send, recv = (rank - step) % world, (rank - step - 1) % world")],
        5: [("    if current:\n        buckets.append(current)\n", ""),  # last lost
            ("reversed(list(model.parameters()))", "list(model.parameters())")],
    },
    "05-finetuning": {
        1: [("pooled = (h * w).sum(dim=1) / w.sum(dim=1)",
             "pooled = h.mean(dim=1)"),                          # padding averaged in
            ("pooled = (h * w).sum(dim=1) / w.sum(dim=1)", "pooled = h[:, -1]"),
            (" / w.sum(dim=1)", "")],                            # a sum, not a mean
        2: [("self.scaling * ", ""),                             # missing scale
            ("self.base(x) + ", "")],                            # base layer dropped
        3: [("lora.scaling * lora.B @ lora.A", "lora.B @ lora.A"),
            ("            merged.bias.copy_(base.bias)\n", "            pass\n"),
            ("base.weight + lora.scaling", "lora.scaling")],
    },
    "06-pretraining-data": {
        1: [("i += 2", "i += 1"),                                # overlapping pairs
            ("if i + 1 < len(ids)", "if i + 2 < len(ids)")],    # last pair missed
        2: [("(u >= 0.8) & (u < 0.9)", "(u >= 0.8)"),           # 20% random, none kept
            (") & ~special", ")"),                               # specials masked
            ("labels = torch.where(chosen, ids, torch.full_like(ids, -100))",
             "labels = ids.clone()")],
        3: [("return (step + 1) / warmup", "return step / warmup"),
            ("0.5 * (1 - min_ratio)", "(1 - min_ratio)"),
            ("        return min_ratio\n", "        return 0.0\n")],
    },
    "07-pipeline-schedule": {
        1: [("warm = min(n_stages - stage - 1, n_micro)",
             "warm = min(n_stages - stage, n_micro)"),          # one warm-up too many
            ("warm = min(n_stages - stage - 1, n_micro)",
             "warm = n_stages - stage - 1"),                     # not capped at m
            ('steps += [("F", i), ("B", i - warm)]',
             'steps += [("B", i - warm), ("F", i)]')],
        2: [('held += 1 if kind == "F" else -1', 'held += 1 if kind == "F" else 0'),
            ("peak = max(peak, held)", "peak = held")],
        3: [("start = max(free[s], done[need][1] if need else 0.0)",
             "start = free[s]"),                                 # input time ignored
            ('end = start + (t_f if kind == "F" else t_b)', "end = start + t_f"),
            ('need = ("F", s - 1, i) if s > 0 else None',
             'need = ("F", s - 1, i - 1) if s > 0 and i > 0 else None')],
        4: [("(n_micro + n_stages - 1)", "(n_micro + n_stages)"),
            ("return (n_stages - 1) /", "return n_stages /"),
            ("(n_stages - 1) / (n_micro + n_stages - 1)", "(n_stages - 1) / n_micro")],
        5: [("loss = loss_fn(outputs[(s, i)], ys[i]) / n_micro",
             "loss = loss_fn(outputs[(s, i)], ys[i])"),          # missing 1/m
            ("torch.autograd.backward(outputs[(s, i)], inputs[(s + 1, i)].grad)",
             "outputs[(s, i)].sum().backward()"),                # wrong upstream grad
            ("total += loss.item()", "total = loss.item()")],
        6: [("if len(waiting) > stage:", "if len(waiting) >= stage:"),  # one W early
            ("waiting.pop(0)", "waiting.pop()"),                 # newest W first
            ("return steps + [(\"W\", i) for i in waiting]", "return steps"),
            ("if j + warm < n_micro:", "if j < n_micro:")],      # F past the end
    },
    "08-kv-cache": {
        1: [("query_pos = torch.arange(past, s).unsqueeze(1)",
             "query_pos = torch.arange(t_new).unsqueeze(1)"),    # offset forgotten
            ("torch.arange(s).unsqueeze(0) <= query_pos",
             "torch.arange(s).unsqueeze(0) < query_pos"),        # off by one
            (" / math.sqrt(q.shape[-1])", "")],                  # missing scale
        2: [("torch.cat([self.k, k], dim=-2)", "torch.cat([self.k, k], dim=-1)"),
            ("self.v = torch.cat([self.v, v], dim=-2)", "self.v = v"),
            ("return 0 if self.k is None else self.k.shape[-2]",
             "return 0 if self.k is None else self.k.shape[0]")],
        3: [("logits, _ = model(fresh, kv_caches=caches)",
             "logits, _ = model(out, kv_caches=caches)"),        # prefix fed again
            ("logits[:, -1].argmax(dim=-1, keepdim=True)",
             "logits[:, 0].argmax(dim=-1, keepdim=True)"),
            ("logits, _ = model(fresh, kv_caches=caches)",
             "logits, _ = model(fresh)")],                       # cache not used
        4: [("return 2 * n_layer", "return n_layer"),            # keys only
            ("2 * n_layer * batch * seq_len", "2 * batch * seq_len"),
            ("* n_embd * bytes_per_value", "* n_embd * 4")],
    },
    "09-fp8-matmul": {
        1: [("return (a8.float() @ b8.float().t()) / (sa * sb)",
             "return (a8.float() @ b8.float().t()) / sa"),        # one scale undone
            ("return (a8.float() @ b8.float().t()) / (sa * sb)",
             "return (a8.float() @ b8.float().t()) * (sa * sb)"),
            ("b8, sb = to_float8(b_t, E4M3)", "b8, sb = to_float8(b_t, E5M2)")],
        2: [("g8, sg = to_float8(gy, E5M2)", "g8, sg = to_float8(gy, E4M3)"),
            ("grad_x = (g8.float() @ w8.float()) / (sg * sw)",
             "grad_x = (g8.float() @ w8.float()) / sw"),
            ("grad_w = (g8.float().t() @ x8.float()) / (sg * sx)",
             "grad_w = (g8.float().t() @ x8.float()) / (sg * sw)")],
        3: [("return (x.float() * scale).clamp(-fmax, fmax).to(dtype)",
             "return (x.float() * scale).to(dtype)"),             # no saturation
            ("fmax = torch.finfo(dtype).max", "fmax = 448.0"),    # e4m3's max for all
            ("(x.float() * scale)", "(x.float() / scale)")],
        4: [("scales = 448.0 / amax", "scales = 57344.0 / amax"),   # e5m2's maximum
            ("reshape(m, k // block, block)", "reshape(m, block, k // block)"),
            ("tiles.abs().amax(dim=-1)", "tiles.abs().amax(dim=-1).amax(dim=-1, "
             "keepdim=True)")],                                     # one per row
        5: [("torch.trunc(acc * 2.0 ** (bits - e))",
             "torch.round(acc * 2.0 ** (bits - e))"),               # to nearest
            ("            acc = torch.zeros((), dtype=torch.float64)\n",
             "            pass\n"),                                  # never restarts
            ("_, e = torch.frexp(acc)", "_, e = torch.frexp(t)")],
    },
    "10-mixed-precision-loop": {
        1: [("            p.copy_(m)\n", "            pass\n"),    # not copied back
            ("m -= self.lr * p.grad.float()", "p -= self.lr * p.grad"),   # no master
            ("m -= self.lr * p.grad.float()", "m += self.lr * p.grad.float()")],
        2: [("FP16_MAX / amax", "448.0 / amax"),                 # e4m3's maximum
            ("    return 2.0 ** k\n", "    return 2.0 ** (k - 1)\n"),
            ("        return 1.0\n", "        return 0.0\n")],
        3: [("    scaler.unscale_(opt)\n    torch.nn.utils.clip_grad_norm_("
             "model.parameters(), max_norm)\n",
             "    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)\n"
             "    scaler.unscale_(opt)\n"),                       # clips scaled grads
            ("    scaler.update()\n", ""),                          # scale never moves
            ("    opt.zero_grad(set_to_none=True)\n", ""),          # grads accumulate
            ("scaler.scale(loss).backward()", "loss.backward()")],
        4: [("absmax = blocks.abs().amax(dim=1)",
             "absmax = blocks.abs().amax().expand(blocks.shape[0])"),  # one scale
            ("torch.bucketize(normed.flatten(), midpoints)",
             "torch.bucketize(normed.flatten(), code[1:])"),            # rounds down
            ("pad = (-flat.numel()) % block_size", "pad = 0")],          # no padding
    },
    "11-zero-by-hand": {
        1: [("end = start + base + (1 if rank < extra else 0)",
             "end = start + base"),                              # remainder lost
            ("(1 if rank < extra else 0)", "(1 if rank <= extra else 0)"),
            ("(1 if rank < extra else 0)", "(1 if rank >= world - extra else 0)")],
        2: [(" / world for s, e in bounds]", " for s, e in bounds]"),   # a sum
            ("sum(gr[s:e] for gr in flat_grads) / world", "flat_grads[0][s:e]")],
        3: [("        for model in self.models:\n"
             "            vector_to_parameters(full, model.parameters())",
             "        vector_to_parameters(full, self.models[0].parameters())"),
            ("reduce_scatter_mean(flat_grads, self.bounds)",
             "reduce_scatter_mean(flat_grads[:1], self.bounds)")],  # no communication
        4: [("    if stage >= 2:\n        grads /= world\n", ""),
            ("4 * n_params, 4 * n_params, 8 * n_params",
             "4 * n_params, 4 * n_params, 4 * n_params"),          # one moment
            ("        adam /= world\n",
             "        adam /= world\n        weights /= world\n")],
        5: [("part = chunk[i:i + block]", "part = chunk"),           # one scale a chunk
            ("torch.round(part * scale) / scale", "part"),           # not quantised
            ("shards.append(total / world)", "shards.append(total)"),  # a sum
            ("scale = 127 / part.abs().max()", "scale = 255 / part.abs().max()")],
    },
    "12-mixture-of-experts": {
        1: [("    for j in range(k):  # every token's first choice, then every second "
             "choice\n        for s in range(S):",
             "    for s in range(S):  # token by token\n        for j in range(k):"),
            ("keep = slot < capacity", "keep = slot <= capacity"),     # off by one
            ("probs.topk(k, dim=-1).indices", "probs.argsort(dim=-1)[:, :k]")],
        2: [("/ expert.numel()", "/ S"),                          # k times too large
            ("return E * (f * P).sum()", "return (f * P).sum()"),
            ("P = probs.mean(dim=0)", "P = probs.detach().mean(dim=0)")],  # no grad
        3: [("torch.sign(load.mean() - load)", "torch.sign(load - load.mean())"),
            ("rate * torch.sign(load.mean() - load)", "rate * (load.mean() - load)")],
        4: [("((expert == e) & keep)", "(expert == e)"),          # drops ignored
            ("gates[s, j, None] * ffn(x[s])", "ffn(x[s])"),       # no gate
            ("    gates = gates / gates.sum(dim=1, keepdim=True)", "    pass"),
            (".softmax(dim=-1)  # (S, E)", ".softmax(dim=0)  # (S, E)")],
        5: [("sent[src].chunk(n)[dst] for src", "sent[dst].chunk(n)[src] for src"),
            ("for src in range(n)]", "for src in reversed(range(n))]")],
    },
}
