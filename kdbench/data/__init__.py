"""Data sets as LightningDataModules. Each data set is one module here and one file in
``conf/dataset/`` whose ``_target_`` names its class (a subclass of
:class:`kdbench.data.base.ArrayDataModule`)."""
