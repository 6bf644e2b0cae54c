"""Schemes: WHO teaches whom, and when. One LightningModule per scheme, one config file each in
``conf/scheme/`` whose ``_target_`` names the class."""
