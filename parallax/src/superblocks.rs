//! The two superblock copies: reading both and choosing the current one, saying what is
//! wrong with the other, and writing a commit into both.
//!
//! A commit writes its superblock first into the copy that does not hold the last commit and
//! syncs (the commit is durable then, and a torn write there leaves the last commit's copy
//! whole), then writes the same superblock into the other copy and syncs again. So once a
//! commit returns, both copies hold it, and one damaged copy (a flipped bit, a bad sector)
//! costs nothing: the other holds the same commit. Only a crash in the middle of a commit can
//! leave a torn copy, and then the other one holds the last commit that returned (or the one
//! cut short, if its first sync had finished). A damaged copy is reported by `check` and at
//! open ([`Copies::damage`]), and the next commit rewrites it (an open for writing makes sure
//! there is one).

use crate::backing::Backing;
use crate::error::{Error, Result};
use crate::format::{Superblock, SuperblockError, BLOCK, BLOCK_SHIFT, MAGIC};

/// What one superblock copy holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CopyState {
    /// A valid superblock.
    Valid(Box<Superblock>),
    /// All zeroes: never written (a new image's second copy before its second commit, in
    /// images written before both copies were kept in step).
    NeverWritten,
    /// Damaged; `claims` is the generation its (unchecked) bytes name, if it has the magic
    /// number.
    Damaged {
        /// Why it is not usable.
        why: SuperblockError,
        /// The generation its bytes name.
        claims: Option<u64>,
    },
}

/// Both copies, and the one chosen.
#[derive(Clone, Debug)]
pub(crate) struct Copies {
    /// The copy chosen (0 or 1): the valid one with the higher generation.
    pub copy: u64,
    /// Its superblock.
    pub sb: Superblock,
    /// What each copy holds.
    pub states: [CopyState; 2],
}

fn state_of(b: &[u8]) -> CopyState {
    match Superblock::decode(b) {
        Ok(sb) => CopyState::Valid(Box::new(sb)),
        Err(SuperblockError::BadMagic) if b.iter().all(|&x| x == 0) => CopyState::NeverWritten,
        Err(why) => CopyState::Damaged {
            claims: (b.len() >= 64 && b[..8] == MAGIC)
                .then(|| u64::from_le_bytes(b[56..64].try_into().unwrap_or_default())),
            why,
        },
    }
}

/// Reads both superblock copies of `backing` and picks the current one.
pub(crate) fn read<B: Backing>(backing: &B) -> Result<Copies> {
    let size = backing
        .size()
        .map_err(|e| Error::io("reading the store size", e))?;
    if size < 2 * BLOCK as u64 {
        return Err(Error::NotParallax(format!(
            "{size} bytes is too small to hold the superblocks"
        )));
    }
    let read = |copy: u64| -> Result<CopyState> {
        let mut b = vec![0u8; BLOCK];
        backing
            .read_at(&mut b, copy * BLOCK as u64)
            .map_err(|e| Error::io(format!("reading superblock copy {copy}"), e))?;
        Ok(state_of(&b))
    };
    let states = [read(0)?, read(1)?];
    let (copy, sb) = match (&states[0], &states[1]) {
        // A copy written by a newer build (its checksum is good): leave the image alone.
        (
            CopyState::Damaged {
                why: e @ SuperblockError::Unsupported(_),
                ..
            },
            _,
        )
        | (
            _,
            CopyState::Damaged {
                why: e @ SuperblockError::Unsupported(_),
                ..
            },
        ) => return Err(Error::Unsupported(e.to_string())),
        (CopyState::Valid(a), CopyState::Valid(b)) if b.generation > a.generation => {
            (1, (**b).clone())
        }
        (CopyState::Valid(a), _) => (0, (**a).clone()),
        (_, CopyState::Valid(b)) => (1, (**b).clone()),
        (CopyState::Damaged { why, .. }, CopyState::Damaged { why: other, .. })
            if *why != SuperblockError::BadMagic || *other != SuperblockError::BadMagic =>
        {
            return Err(Error::Corrupt(format!(
                "both superblock copies are damaged (copy 0: {why}; copy 1: {other})"
            )))
        }
        (CopyState::Damaged { why, .. }, CopyState::NeverWritten)
        | (CopyState::NeverWritten, CopyState::Damaged { why, .. })
            if *why != SuperblockError::BadMagic =>
        {
            return Err(Error::Corrupt(format!(
                "the only superblock copy ever written is damaged ({why})"
            )))
        }
        _ => return Err(Error::NotParallax("no Parallax magic number".into())),
    };
    Ok(Copies { copy, sb, states })
}

impl Copies {
    /// What is wrong with the copy not chosen, in words, if it is damaged (an open logs it,
    /// `check` reports it as a problem); whether the last commit may be lost with it.
    pub fn damage(&self) -> Option<String> {
        let other = 1 - self.copy;
        let CopyState::Damaged { why, claims } = &self.states[other as usize] else {
            return None;
        };
        let now = self.sb.generation;
        let tail = match claims {
            Some(g) if *g > now => format!(
                "; its bytes name generation {g}, newer than generation {now} in copy {}: \
                 the writes of the last {} commit(s) may be lost",
                self.copy,
                g - now
            ),
            _ => format!(
                "; copy {} holds generation {now}, and the next commit rewrites copy {other}",
                self.copy
            ),
        };
        Some(format!("superblock copy {other} is damaged ({why}){tail}"))
    }

    /// One copy in words, for `check`'s report.
    pub fn describe(&self, copy: u64) -> String {
        match &self.states[copy as usize] {
            CopyState::Valid(sb) if copy == self.copy => {
                format!("generation {} (current)", sb.generation)
            }
            CopyState::Valid(sb) if sb.generation == self.sb.generation => {
                format!("generation {} (the same commit)", sb.generation)
            }
            CopyState::Valid(sb) => format!("generation {} (an earlier commit)", sb.generation),
            CopyState::NeverWritten => "never written".into(),
            CopyState::Damaged { why, .. } => format!("damaged ({why}); the other copy is used"),
        }
    }
}

/// Writes the superblock `sb` of a commit: into copy `primary` (the one not holding the last
/// commit), synced, then into the other copy, synced. When this returns, both copies hold
/// the commit.
pub(crate) fn write_commit<B: Backing>(backing: &B, sb: &Superblock, primary: u64) -> Result<()> {
    let bytes = sb.encode();
    backing
        .write_at(&bytes[..], primary << BLOCK_SHIFT)
        .map_err(|e| Error::io("writing the superblock", e))?;
    backing
        .flush()
        .map_err(|e| Error::io("syncing the superblock", e))?;
    backing
        .write_at(&bytes[..], (1 - primary) << BLOCK_SHIFT)
        .map_err(|e| Error::io("writing the second superblock copy", e))?;
    backing
        .flush()
        .map_err(|e| Error::io("syncing the second superblock copy", e))
}

#[cfg(test)]
mod tests {
    use crate::backing::{Backing, MemBacking};
    use crate::check::check;
    use crate::image::{CreateOptions, Image, OpenOptions};

    const MIB: u64 = 1 << 20;

    /// Writes block 0 and a new block (so the flush commits: a new generation).
    fn write_and_commit(img: &mut Image<MemBacking>, fill: u8) {
        let v = img.volume("base").unwrap();
        img.write_at(v, 0, &[fill; 4096]).unwrap();
        img.write_at(v, u64::from(fill) * 65536, &[fill; 4096])
            .unwrap();
        img.flush().unwrap();
    }

    fn first_block(b: &MemBacking) -> u8 {
        let mut img = Image::open(b.clone(), &OpenOptions::default()).unwrap();
        let v = img.volume("base").unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(v, 0, &mut buf).unwrap();
        buf[0]
    }

    /// After a commit both copies hold it: with one byte flipped in either copy, the image
    /// opens at the newest generation with the last commit's data, says which copy is
    /// damaged, and `check` reports it as a problem. (With one copy per generation, the
    /// damage silently brought back the previous generation.)
    #[test]
    fn one_damaged_copy_loses_no_commit_and_is_reported() {
        let mut o = CreateOptions::new(4 * MIB);
        o.cache_slots = 8;
        let mut img = Image::create(MemBacking::new(), &o).unwrap();
        for fill in 1..=3 {
            write_and_commit(&mut img, fill);
        }
        assert!(img.superblock().generation >= 4, "a commit each");
        let newest = img.superblock().generation;
        let bytes = img.backing().to_bytes();
        drop(img);
        for copy in 0..2 {
            let mut b = bytes.clone();
            b[copy * 4096 + 100] ^= 1;
            let mb = MemBacking::from_bytes(b);
            let img = Image::open(mb.clone(), &OpenOptions::default()).unwrap();
            assert_eq!(img.superblock().generation, newest, "copy {copy} damaged");
            let damage = img.superblock_damage().expect("damage noticed");
            assert!(
                damage.starts_with(&format!(
                    "superblock copy {copy} is damaged (checksum mismatch)"
                )),
                "{damage}"
            );
            drop(img);
            assert_eq!(first_block(&mb), 3);
            let r = check(&mb, None).unwrap();
            assert!(!r.is_clean(), "{r}");
            assert!(
                r.problems[0].contains(&format!("superblock copy {copy} is damaged")),
                "{r}"
            );
            // The next flush of a writable open commits and rewrites the damaged copy, even
            // with nothing else to commit: clean again.
            let mut img = Image::open(mb.clone(), &OpenOptions::default()).unwrap();
            img.flush().unwrap();
            drop(img);
            let r = check(&mb, None).unwrap();
            assert!(r.is_clean(), "{r}");
        }
        // Undamaged: clean, both copies of the same commit.
        let r = check(&MemBacking::from_bytes(bytes), None).unwrap();
        assert!(r.is_clean(), "{r}");
        assert!(r.superblocks[1].contains("the same commit"), "{r}");
    }

    /// In an image whose other copy holds an earlier commit (written before both copies were
    /// kept in step), damage to the current copy is reported with the generation it names:
    /// the last commit may be lost, and the open and `check` say so.
    #[test]
    fn damage_that_loses_a_commit_says_so() {
        let mut o = CreateOptions::new(4 * MIB);
        o.cache_slots = 8;
        let mut img = Image::create(MemBacking::new(), &o).unwrap();
        write_and_commit(&mut img, 1);
        let copy = img.committed_copy as usize;
        let newest = img.superblock().generation;
        let mut b = img.backing().to_bytes();
        drop(img);
        // The other copy one commit behind, then damage to the current one.
        let mut older = crate::format::Superblock::decode(&b[copy * 4096..][..4096]).unwrap();
        older.generation -= 1;
        let other = 1 - copy;
        b[other * 4096..][..4096].copy_from_slice(&older.encode()[..]);
        b[copy * 4096 + 200] ^= 4;
        let mb = MemBacking::from_bytes(b);
        let img = Image::open(mb.clone(), &OpenOptions::default()).unwrap();
        assert_eq!(img.superblock().generation, newest - 1);
        let damage = img.superblock_damage().unwrap();
        assert!(
            damage.contains(&format!(
                "name generation {newest}, newer than generation {}",
                newest - 1
            )) && damage.contains("may be lost"),
            "{damage}"
        );
        drop(img);
        let r = check(&mb, None).unwrap();
        assert!(r.problems.iter().any(|p| p.contains("may be lost")), "{r}");
        assert!(mb.size().unwrap() > 0);
    }
}
