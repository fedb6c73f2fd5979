//! Where the programs run, and the one naming scheme of their pinned links.
//!
//! Every link the agent makes is pinned under `links/` with a name from
//! [`PINS`]: attach, adopt, forget, `status` and `cleanup` all go through
//! [`Pin::pin_name`] and [`Pin::parse`], so a new kind of hook is one more
//! row of that table and every one of them knows it at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::SystemTime,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, SchedClassifier, TcAttachType, Xdp,
        tc::SchedClassifierLink, xdp::XdpLink,
    },
};
use proxy_common::program_names;

use super::{
    DatapathConfig, DatapathError, SOCK_PROGRAMS, XdpSetting,
    pins::{
        adopt_link, adopt_pinned, link_target, links_dir, open_pinned_link, pin_link, unpin_link,
    },
    program_err,
};

/// One kind of pinned link: what it attaches and how its pin is named
/// (`<prefix><interface>`, or `<prefix><program>-<cgroup tag>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// `kep_tc_ingress` at TC ingress of a pod-facing interface.
    TcPod,
    /// `kep_tc_node` at TC ingress of a node interface.
    TcNode,
    /// `kep_tc_egress` at TC egress of a pod or node interface (what the
    /// node itself sends: a host endpoint's replies, its ICMP errors).
    TcEgress,
    /// `kep_xdp_node` on a node interface.
    XdpNode,
    /// One of the socket programs on a cgroup.
    Cgroup,
}

/// Every kind of pin and its name prefix. No prefix is a prefix of another,
/// so a name parses one way.
pub const PINS: [(Pin, &str); 5] = [
    (Pin::TcPod, "tc-ingress-"),
    (Pin::TcNode, "tc-node-"),
    (Pin::TcEgress, "tc-egress-"),
    (Pin::XdpNode, "xdp-"),
    (Pin::Cgroup, "cgroup-"),
];

impl Pin {
    fn prefix(self) -> &'static str {
        PINS.iter()
            .find(|(pin, _)| *pin == self)
            .map(|(_, prefix)| *prefix)
            .expect("every pin kind has a row in PINS")
    }

    /// The pin's file name for `what` (an interface, or program and cgroup).
    pub fn pin_name(self, what: &str) -> String {
        format!("{}{what}", self.prefix())
    }

    /// The kind and subject of a pin's file name; `None` for a name the
    /// agent never makes (which `cleanup` then leaves alone).
    pub fn parse(name: &str) -> Option<(Pin, &str)> {
        PINS.iter()
            .find_map(|(pin, prefix)| name.strip_prefix(prefix).map(|rest| (*pin, rest)))
            .filter(|(_, rest)| !rest.is_empty())
    }
}

/// Which programs an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A pod's veth: traffic from pods.
    Pod,
    /// The node's own interface: traffic from outside the node (TC, and
    /// XDP in front of it when the mode allows).
    Node,
}

impl Hook {
    pub(super) fn program(self) -> &'static str {
        match self {
            Hook::Pod => program_names::TC_POD_INGRESS,
            Hook::Node => program_names::TC_NODE_INGRESS,
        }
    }

    /// The TC link's pin kind.
    fn tc(self) -> Pin {
        match self {
            Hook::Pod => Pin::TcPod,
            Hook::Node => Pin::TcNode,
        }
    }

    /// Every pin an interface with this hook may have.
    fn pins(self) -> &'static [Pin] {
        match self {
            Hook::Pod => &[Pin::TcPod, Pin::TcEgress],
            Hook::Node => &[Pin::TcNode, Pin::TcEgress, Pin::XdpNode],
        }
    }
}

/// The object's programs as loaded with its maps, before the verifier has
/// seen them (see [`super::Datapath::load_maps`]).
pub struct Unverified {
    ebpf: Ebpf,
    bpffs: PathBuf,
    xdp: XdpSetting,
}

impl Unverified {
    pub(super) fn new(ebpf: Ebpf, cfg: &DatapathConfig) -> Self {
        Self {
            ebpf,
            bpffs: cfg.bpffs.clone(),
            xdp: cfg.xdp,
        }
    }

    /// Loads every program the agent attaches into the kernel, all at once:
    /// the verifier walks one program on one CPU, and the two TC ingress
    /// programs take about a second each, so one thread per program makes
    /// agent start the longest program's, not their sum, where there are
    /// cores for it.
    pub fn verify(mut self) -> Result<Hooks, DatapathError> {
        std::thread::scope(|scope| {
            let running: Vec<_> = self
                .ebpf
                .programs_mut()
                .filter_map(|(name, prog)| {
                    let (name, load) = loader(name)?;
                    Some(scope.spawn(move || {
                        lower_priority();
                        load(name, prog)
                    }))
                })
                .collect();
            running
                .into_iter()
                .try_for_each(|thread| thread.join().expect("a program's load does not panic"))
        })?;
        for name in PACKET_PROGRAMS.into_iter().chain(SOCK_PROGRAMS) {
            if self.ebpf.program(name).is_none() {
                return Err(program_err(name, aya::programs::ProgramError::NotLoaded));
            }
        }
        Ok(Hooks {
            ebpf: self.ebpf,
            attached: BTreeMap::new(),
            cgroup: None,
            links: BTreeMap::new(),
            link_names: Default::default(),
            bpffs: self.bpffs,
            xdp: self.xdp,
        })
    }
}

/// Niceness of the verifier threads. At start they run beside the
/// source's read, which the first sync waits for: on 2 cores at 30,000
/// Services, favouring the read brought `datapath programmed` from 1.99 s
/// to 1.90 s (medians of 6 starts each; nice 5: 1.95 s, nice 19: 1.86 s).
/// Not lower: on a node busy with other work the verifier still gets a
/// fair share (about a tenth of a core against each competing thread at
/// nice 0), so start-up never waits on the node's load alone.
const VERIFIER_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority to [`VERIFIER_NICE`] (Linux keeps
/// a nice value per thread). Failing leaves it as it is, which is fine.
fn lower_priority() {
    // SAFETY: setpriority only reads its arguments; who = 0 is the caller.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, VERIFIER_NICE) };
}

/// Every program the agent attaches beside the socket hooks.
const PACKET_PROGRAMS: [&str; 4] = [
    program_names::TC_POD_INGRESS,
    program_names::TC_NODE_INGRESS,
    program_names::TC_EGRESS,
    program_names::XDP_NODE,
];

/// How a program the agent attaches is loaded, under its `'static` name
/// (`None`: the object's other programs, never loaded).
type LoadFn = fn(&'static str, &mut Program) -> Result<(), DatapathError>;
fn loader(name: &str) -> Option<(&'static str, LoadFn)> {
    let found = |names: &[&'static str]| names.iter().copied().find(|n| *n == name);
    if let Some(name) = found(&SOCK_PROGRAMS) {
        return Some((name, load_sock));
    }
    let name = found(&PACKET_PROGRAMS)?;
    Some(if name == program_names::XDP_NODE {
        (name, load_xdp)
    } else {
        (name, load_tc)
    })
}

fn load_tc(name: &'static str, prog: &mut Program) -> Result<(), DatapathError> {
    load_program(name, prog, SchedClassifier::load)
}

fn load_xdp(name: &'static str, prog: &mut Program) -> Result<(), DatapathError> {
    load_program(name, prog, Xdp::load)
}

fn load_sock(name: &'static str, prog: &mut Program) -> Result<(), DatapathError> {
    load_program(name, prog, CgroupSockAddr::load)
}

/// Loads (verifies) program `name` as type `P` (aya gives the types'
/// `load` no common trait, hence the function argument).
fn load_program<P>(
    name: &'static str,
    prog: &mut Program,
    load: fn(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), DatapathError>
where
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = prog.try_into().map_err(|e| program_err(name, e))?;
    load(prog).map_err(|e| program_err(name, e))
}

/// The verified programs and where they run: interfaces and the cgroup,
/// through pinned links. The maps they read are [`super::Datapath`]'s.
pub struct Hooks {
    ebpf: Ebpf,
    /// Interfaces (name -> ifindex, hook) whose pinned TC link runs this
    /// process's program.
    attached: BTreeMap<String, (u32, Hook)>,
    /// The cgroup the socket hooks are attached to.
    cgroup: Option<PathBuf>,
    /// The links checked so far, open, by pin name (see `link_alive`).
    links: BTreeMap<String, OwnedFd>,
    /// The pin names under `links/`, and the directory's mtime then.
    link_names: (Option<SystemTime>, BTreeSet<String>),
    bpffs: PathBuf,
    xdp: XdpSetting,
}

impl Hooks {
    /// The pod-side TC program, for attaching elsewhere or `test_run`.
    pub fn classifier(&mut self) -> &mut SchedClassifier {
        self.hook_program(Hook::Pod)
    }

    /// The TC program of `hook`.
    pub fn hook_program(&mut self, hook: Hook) -> &mut SchedClassifier {
        self.tc_program(hook.program())
    }

    /// The egress program (what the node itself sends), for `test_run`.
    pub fn egress_program(&mut self) -> &mut SchedClassifier {
        self.tc_program(program_names::TC_EGRESS)
    }

    fn tc_program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked in verify")
    }

    /// The node interfaces' XDP program, for attaching elsewhere or
    /// `test_run`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(program_names::XDP_NODE)
            .and_then(|p| p.try_into().ok())
            .expect("checked in verify")
    }

    /// Attaches the TC program of `hook` at ingress of `iface` (index
    /// `ifindex`), and the egress program at its egress, each through a
    /// pinned TCX link. A link pinned by an earlier agent is adopted: its
    /// program is swapped for this one atomically, so traffic never sees a
    /// gap. Attaching twice is a no-op.
    pub fn attach(&mut self, iface: &str, ifindex: u32, hook: Hook) -> Result<(), DatapathError> {
        if self.attached.get(iface) == Some(&(ifindex, hook)) {
            return Ok(());
        }
        let links = links_dir(&self.bpffs);
        for (program, pin, direction) in [
            (hook.program(), hook.tc(), TcAttachType::Ingress),
            (
                program_names::TC_EGRESS,
                Pin::TcEgress,
                TcAttachType::Egress,
            ),
        ] {
            // A link checked before under this name is not the one made now.
            self.links.remove(&pin.pin_name(iface));
            self.attach_tc(iface, program, &links.join(pin.pin_name(iface)), direction)
                .map_err(|source| DatapathError::Attach {
                    iface: iface.to_string(),
                    source,
                })?;
        }
        if hook == Hook::Node {
            self.attach_xdp(iface);
        }
        self.attached.insert(iface.to_string(), (ifindex, hook));
        Ok(())
    }

    /// `program` at `direction` of `iface` through the TCX link pinned at
    /// `pin`: adopted when an earlier agent left one, else made and pinned.
    fn attach_tc(
        &mut self,
        iface: &str,
        program: &str,
        pin: &Path,
        direction: TcAttachType,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let prog = self.tc_program(program);
        let adopted = adopt_pinned(pin, |link| {
            let id = prog.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            // The pin keeps it attached; this process needs no handle.
            drop(prog.take_link(id)?);
            Ok(())
        });
        if !adopted {
            let id = prog.attach(iface, direction)?;
            pin_link(prog.take_link(id)?, pin)?;
        }
        Ok(())
    }

    /// The XDP fast path on a node interface, in the first mode of
    /// [`XdpSetting::modes`] the kernel accepts; a fallback or a failure is
    /// a warning, never fatal: the TC program, attached first, serves the
    /// interface alone.
    fn attach_xdp(&mut self, iface: &str) {
        let pin = links_dir(&self.bpffs).join(Pin::XdpNode.pin_name(iface));
        let held = self.links.remove(&Pin::XdpNode.pin_name(iface));
        let (modes, why) = self.xdp.modes(iface);
        if modes.is_empty() {
            // An earlier agent's fast path goes with the setting.
            if pin.exists() {
                unpin_link(&pin, held);
                tracing::info!(iface, "XDP fast path detached ({why})");
            } else {
                tracing::info!(iface, "no XDP fast path ({why})");
            }
            return;
        }
        let prog = self.xdp_program();
        if adopt_pinned(&pin, |link| {
            let id = prog.attach_to_link(XdpLink::try_from(link)?)?;
            drop(prog.take_link(id)?);
            Ok(())
        }) {
            return;
        }
        let mut failures = Vec::new();
        for &(mode, name) in modes {
            let attached = prog
                .attach(iface, mode)
                .map_err(|e| e.to_string())
                .and_then(|id| prog.take_link(id).map_err(|e| e.to_string()))
                .and_then(|link| pin_link(link, &pin).map_err(|e| e.to_string()));
            match attached {
                Ok(()) if failures.is_empty() => {
                    tracing::info!(iface, mode = name, "XDP fast path attached ({why})");
                    return;
                }
                Ok(()) => {
                    tracing::warn!(iface, mode = name, refused = %failures.join("; "), "XDP fast path attached in a fallback mode");
                    return;
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        tracing::warn!(iface, errors = %failures.join("; "), "no XDP fast path: the TC program serves this interface alone");
    }

    /// Attaches the socket hooks to the cgroup v2 directory `path`: every
    /// process below it, in this network namespace, reaches Services by
    /// socket-level translation. [`Hooks::check_cgroup`] keeps them
    /// attached from then on.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), DatapathError> {
        for name in SOCK_PROGRAMS {
            self.attach_sock(name, path)?;
        }
        self.cgroup = Some(path.to_path_buf());
        Ok(())
    }

    /// Socket hooks detached behind the agent's back (`bpftool link
    /// detach`, their pin removed) are attached again; returns their
    /// programs' names.
    pub fn check_cgroup(&mut self) -> Result<Vec<&'static str>, DatapathError> {
        let Some(path) = self.cgroup.clone() else {
            return Ok(Vec::new());
        };
        let (seen, present) = self.link_pins();
        let mut redone = Vec::new();
        for name in SOCK_PROGRAMS {
            let pin = self.sock_pin(name, &path);
            if self.link_alive(&pin, &present) {
                continue;
            }
            self.unpin(&pin);
            self.attach_sock(name, &path)?;
            redone.push(name);
        }
        if redone.is_empty() {
            self.link_names = (seen, present);
        }
        Ok(redone)
    }

    /// One pin per program and cgroup: a different cgroup next time is
    /// attached afresh, not confused with this one.
    fn sock_pin(&self, program: &str, cgroup: &Path) -> String {
        let tag: String = cgroup
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Pin::Cgroup.pin_name(&format!("{program}-{tag}"))
    }

    /// Socket program `name` on cgroup `path` through its pinned link,
    /// adopted or made.
    fn attach_sock(&mut self, name: &'static str, path: &Path) -> Result<(), DatapathError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::AttachCgroup {
            path: path.to_path_buf(),
            source,
        };
        let pin_name = self.sock_pin(name, path);
        self.links.remove(&pin_name);
        let pin = links_dir(&self.bpffs).join(pin_name);
        let prog: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked in verify");
        // aya has no attach_to_link for cgroup programs: the pinned link is
        // updated with BPF_LINK_UPDATE directly.
        if adopt_link(&pin, prog.fd().map_err(|e| err(Box::new(e)))?.as_fd()) {
            return Ok(());
        }
        let cgroup = std::fs::File::open(path).map_err(|e| err(Box::new(e)))?;
        // aya attaches through a BPF link where the kernel has them; a
        // link takes no attach flags (EINVAL otherwise) and never evicts
        // other programs (a CNI's) from the cgroup.
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| err(Box::new(e)))?;
        pin_link(link, &pin).map_err(err)
    }

    /// Whether `iface` with index `ifindex` runs this process's program of
    /// `hook`.
    pub fn is_attached(&self, iface: &str, ifindex: u32, hook: Hook) -> bool {
        self.attached.get(iface) == Some(&(ifindex, hook))
    }

    /// Forgets interfaces whose pinned link was detached behind the agent's
    /// back (`bpftool link detach`, another tool), so the next scan attaches
    /// them again. Returns their names.
    pub fn forget_detached(&mut self) -> Vec<String> {
        let (seen, present) = self.link_pins();
        let mut dead: Vec<(String, Vec<String>)> = Vec::new();
        let attached: Vec<(String, Hook)> = self
            .attached
            .iter()
            .map(|(iface, (_, hook))| (iface.clone(), *hook))
            .collect();
        for (iface, hook) in attached {
            // The TC links must run; an XDP link counts when there is one
            // (the mode may have left it out).
            let pins: Vec<String> = hook
                .pins()
                .iter()
                .filter(|pin| {
                    let name = pin.pin_name(&iface);
                    let optional = **pin == Pin::XdpNode && !present.contains(&name);
                    !optional && !self.link_alive(&name, &present)
                })
                .map(|pin| pin.pin_name(&iface))
                .collect();
            if !pins.is_empty() {
                dead.push((iface, pins));
            }
        }
        self.link_names = (seen, present);
        // Only the dead links go: the next attach adopts the live ones
        // (their traffic never pauses) and makes the others anew.
        for (iface, pins) in &dead {
            self.attached.remove(iface);
            for pin in pins {
                self.unpin(pin);
            }
        }
        dead.into_iter().map(|(iface, _)| iface).collect()
    }

    /// The names of the pins in `links/`, read again only when the
    /// directory changed (its mtime moves with every pin and unpin): one
    /// `stat` per check instead of a lookup per pin.
    /// Taken out of the cache while in use (for borrowing's sake: an early
    /// return leaves the cache empty, to be read again) and put back with
    /// `self.link_names = ...`.
    fn link_pins(&mut self) -> (Option<SystemTime>, BTreeSet<String>) {
        let dir = links_dir(&self.bpffs);
        let changed = dir.metadata().and_then(|m| m.modified()).ok();
        if changed.is_none() || changed != self.link_names.0 {
            let names = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            self.link_names = (changed, names);
        }
        std::mem::take(&mut self.link_names)
    }

    /// Whether the link pinned as `name` (in `present`) is attached. Its fd
    /// is kept open from the first check on, so each later one is a single
    /// syscall (a node with 300 pods has 600 links, checked every poll
    /// interval).
    fn link_alive(&mut self, name: &str, present: &BTreeSet<String>) -> bool {
        if !present.contains(name) {
            self.links.remove(name);
            return false;
        }
        if !self.links.contains_key(name) {
            match open_pinned_link(&links_dir(&self.bpffs).join(name)) {
                Ok(fd) => {
                    self.links.insert(name.to_string(), fd);
                }
                Err(_) => return false,
            }
        }
        matches!(self.links.get(name).map(link_target), Some(Ok(Some(_))))
    }

    /// Removes every pin of `iface`'s hook; the links die with their last
    /// reference.
    fn unpin_hook(&mut self, iface: &str, hook: Hook) {
        for pin in hook.pins() {
            self.unpin(&pin.pin_name(iface));
        }
    }

    /// Removes the link pin `name`; the link is gone when this returns.
    fn unpin(&mut self, name: &str) {
        let held = self.links.remove(name);
        unpin_link(&links_dir(&self.bpffs).join(name), held);
    }

    /// Forgets interfaces that no longer exist, or exist under a new index
    /// (a pod went away, maybe another came under the same name): their TCX
    /// links died with them, and their pins are removed, so the new
    /// interface is attached afresh.
    pub fn forget_missing(&mut self, present: &[(String, u32)]) -> Vec<String> {
        let gone: Vec<(String, Hook)> = self
            .attached
            .iter()
            .filter(|(name, (index, _))| !present.iter().any(|(n, i)| n == *name && i == index))
            .map(|(name, (_, hook))| (name.clone(), *hook))
            .collect();
        for (iface, hook) in &gone {
            self.attached.remove(iface);
            self.unpin_hook(iface, *hook);
        }
        gone.into_iter().map(|(iface, _)| iface).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pin_name_parses_back_to_its_kind() {
        for (pin, _) in PINS {
            let name = pin.pin_name("eth0");
            assert_eq!(Pin::parse(&name), Some((pin, "eth0")), "{name}");
        }
        for other in ["kep_services", "tc-ingress-", "README", "tcx-eth0"] {
            assert_eq!(Pin::parse(other), None, "{other}");
        }
    }
}
