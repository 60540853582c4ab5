"""``ovseg demo``: a local web page to try methods on any image with any words (:mod:`ovseg.demo.commands`)."""
