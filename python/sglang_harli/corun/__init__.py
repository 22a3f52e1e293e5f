"""How finetune work shares the device with decode: what the scheduler hooks observe
(``stats``), the two-stage latency predictor (``predictor``), one policy per mode (``policy``),
the loop that plans before each decode and runs the job's units after it (``controller``), and
rank 0's decisions for every tensor-parallel rank (``ranks``). Imports nothing from SGLang;
tested on plain numbers."""
