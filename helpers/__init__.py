"""What the scripts lean on that a reader need not open first: the plumbing every script shares
(atomic file writes, flag types, Ctrl-C while training) and the helpers of one script each
(preprocess_flickr8k.py's downloads and demo data, search.py's torchrun sharding, serve.py's photo
library, gallery.py's approximate index). The top level keeps the scripts and the modules several
of them share."""
