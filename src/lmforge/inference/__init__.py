"""Using a trained model from Python; every command that is not training builds on this.

`loaded`: `load_for_inference` (a checkpoint or run folder -> `LoadedModel`: model, tokenizer,
special ids, device, architecture). `generate`: sampling on token ids (`SamplingConfig`,
`stream_generate`, `generate`). `text`: the same with text (`stream_text`, `generate_texts`).
`classifier`: `load_classifier`, `predict_texts`. `embedder`: `encode_texts`, `embed`.
`chat_session`: `ChatSession`, a multi-turn conversation with a dialogue GPT.

The modules are imported one by one (nothing is re-exported here), so training, which samples
through `generate`, does not load the rest.
"""
