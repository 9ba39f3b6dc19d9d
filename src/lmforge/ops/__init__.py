"""The fast paths, each with the plain torch path it is tested against; models call them in one line.

- `attention`: `attend` (qkv projection to the output projection's input: lmforge's C++
  kernel on a CPU, torch's SDPA elsewhere, the KV cache), `attend_projections` (BERT's
  separate q / k / v), `sdpa` (torch's, with CPU dropout written out: the reference),
  `causal_mask` (GPT's mask choice).
- `dropout`: `dropout` / `Dropout` (four 16-bit uniforms per 64-bit draw on a CPU).
- `lm_loss`: `lm_head_cross_entropy` (the fused output layer and loss) and
  `reference_lm_head_cross_entropy`.
- `linear`: `add_projection` (a residual projection fused into its product).
- `product`: `linear` (F.linear whose weight gradient, for a layer wider out than in, is taken in
  the orientation MKL runs faster).
- `joined`: `share_rows` / `joined_rows` (layers' weights side by side in one buffer, so a
  stacked product reads them without a copy).
- `decode`: `KVCache` and `append_to_cache` (what a decode step does to the cache).
- `kernels`: the C++ kernels: `ops()` (built by training and `lmforge kernels`, only loaded
  otherwise), `status_line()`, `prepare_for_training(device)`.
- `torch_private`: every private torch hook, behind named functions.

This layer imports base/ only: models pass tensors and small specs, never themselves.
"""
