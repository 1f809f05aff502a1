"""Publishing to the Hugging Face Hub: checks before training, one commit of a finished run, the files chosen for
upload, the model card, and `hfpipe push`."""
