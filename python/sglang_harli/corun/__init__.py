"""How finetune work shares the device with decode: per-iteration statistics today, the latency
predictor and the co-run policy next. Imports nothing from SGLang; tested on plain numbers."""
