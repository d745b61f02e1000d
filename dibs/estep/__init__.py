"""The E-step, free of Lightning: the iteration's rounds of sampling (``step``), the gradient norms a strategy
asks for (``gradnorms``), the training samples it hands over (``samples``) and its view of the processes
(``dist``). ``dibs.lit`` starts it from the training loop."""
