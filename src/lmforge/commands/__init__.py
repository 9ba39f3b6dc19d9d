"""What each `lmforge` command does beyond parsing its arguments: read the inputs, call the
library (`lmforge.inference`, `lmforge.train`, `lmforge.data`, `lmforge.report`), print or
write the outputs. One module per command: quickstart, generate, chat, classify, evaluate
(`lmforge eval`), embed, interop (`import-hf`, `export`), init."""
