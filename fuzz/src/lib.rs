//! editguard's fuzz targets share their bodies with the engine tests through [`readers`].

pub mod readers;
