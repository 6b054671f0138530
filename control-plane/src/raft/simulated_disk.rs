//! The Raft log's redb file on a simulated host's disk
//! ([`cellplane_api::simulation::files`]): a crash of the machine there loses what the log
//! wrote without a sync, so a log that reported an entry durable before its fsync would lose
//! it, as on a real machine, and the simulation would see a committed entry vanish.

use std::io;
use std::path::Path;

use cellplane_api::simulation::files::File;

#[derive(Debug)]
pub struct SimulatedDisk(File);

impl SimulatedDisk {
    pub fn open(path: &Path) -> Self {
        Self(File::open(path))
    }
}

impl redb::StorageBackend for SimulatedDisk {
    fn len(&self) -> io::Result<u64> {
        self.0.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
}
