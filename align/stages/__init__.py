"""The stages that make the GRPO stage's starting checkpoint, one module each: its loss
functions and its loop over the one learner (``medrl.align.learner.Learner``)."""
