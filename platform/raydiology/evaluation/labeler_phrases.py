"""Phrase and cue lists for the rule-based CheXpert-style report labeler (`labeler.py`).

Everything here is a regular-expression fragment matched against lower-cased, whitespace-
normalised report text. Fragments start at a word boundary (added by the labeler) and may end
open ("atelecta" also finds "atelectatic"), so a list reads like a radiologist's vocabulary
rather than like code. The coverage follows the observations, phrase families and cue kinds of
the CheXpert labeler (Irvin et al. 2019, MIT), written anew for a regex engine: CheXpert finds
scope on a dependency parse, this labeler on word windows inside a clause.
"""

from __future__ import annotations

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# Findings that are not one of the 14 columns but still make a report abnormal (they block
# "No Finding" when positive or uncertain, as in CheXpert).
OTHER = "Other Finding"

ECM, CARDIO = "Enlarged Cardiomediastinum", "Cardiomegaly"

# (fragment, observations it names, kind). kind "finding" names the abnormality itself;
# "anatomy" names a structure whose state the sentence gives ("the heart", "mediastinal
# contours"), and is what "stable"/"unchanged" make uncertain (a stable silhouette does not
# say whether it is enlarged); "hedge" names a sign that only suggests the observation
# ("vascular congestion" for edema): uncertain unless negated.
# Order matters only between fragments that start at the same place: the first wins.
MENTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # Enlarged cardiomediastinum / cardiomegaly
    (r"cardiomediastin\w*(?: silhouettes?| contours?)?", (ECM, CARDIO), "anatomy"),
    (r"(?:widen\w*|enlarge\w*) (?:of the )?(?:upper )?mediastin\w*", (ECM,), "finding"),
    (r"mediastinal (?:widening|enlargement)", (ECM,), "finding"),
    (
        r"mediastinal (?:contours?|configuration|silhouettes?|width|shadow|structures)",
        (ECM,),
        "anatomy",
    ),
    (r"mediastinum", (ECM,), "anatomy"),
    (r"(?:pericardial|hilar) (?:silhouettes?|contours?)", (ECM,), "anatomy"),
    (r"cardiac silhouettes? and (?:pulmonary )?vascularity", (CARDIO, ECM), "anatomy"),
    (r"cardiac contours?", (CARDIO, ECM), "anatomy"),
    (r"contours?", (ECM,), "anatomy"),
    (r"cardiomegal\w*|cardiomeg(?:ly|aly)|cardiomeagly", (CARDIO,), "finding"),
    (r"(?:cardiac|heart) enlargement", (CARDIO,), "finding"),
    (r"enlarged (?:heart|cardiac silhouette)", (CARDIO,), "finding"),
    (r"cardiac (?:size|shadow|silhouettes?)", (CARDIO,), "anatomy"),
    (r"(?:the )?heart size", (CARDIO,), "anatomy"),
    (r"(?:the )?heart(?! failure)\b", (CARDIO,), "anatomy"),
    # Lung lesion
    # A "nodular opacity" is read as an opacity, not as a nodule (Open-I's indexers agree);
    # "fibronodular" disease is a nodular lesion.
    (
        r"(?:reticulo-?)?nodular (?:opacit(?:y|ies)|opacification|densit(?:y|ies))",
        ("Lung Opacity",),
        "finding",
    ),
    (r"fibro-?nodular", ("Lung Lesion",), "finding"),
    (r"(?:micro)?nodul(?:e|es|i)\b", ("Lung Lesion",), "finding"),
    (r"(?:masse?s?|mass-?like)\b", ("Lung Lesion",), "finding"),
    (r"lumps?\b", ("Lung Lesion",), "finding"),
    (r"cavitary lesions?", ("Lung Lesion",), "finding"),
    (r"(?:carcinoma|neoplasm|tumou?r|malignan)\w*", ("Lung Lesion",), "finding"),
    # Lung opacity
    (r"opaci\w*", ("Lung Opacity",), "finding"),
    (r"decreased translucency|increased densit(?:y|ies)", ("Lung Opacity",), "finding"),
    (r"air[- ]?space (?:disease|process)", ("Lung Opacity",), "finding"),
    (r"infiltra\w*", ("Lung Opacity",), "finding"),
    (r"interstitial (?:markings?|pattern|lung disease|prominence)", ("Lung Opacity",), "finding"),
    (r"reticular (?:pattern|markings?)|reticulation", ("Lung Opacity",), "finding"),
    (r"(?:peribronchial|bronchial wall|wall) thickening", ("Lung Opacity",), "finding"),
    # Pleural other (before "scar" so that a pleural scar is not a lung opacity)
    (r"pleural thickening", ("Pleural Other",), "finding"),
    (r"pleur(?:al|o)[- ](?:parenchymal |pericardial )?scar\w*", ("Pleural Other",), "finding"),
    (r"fibro(?:sis|thorax|tic)", ("Pleural Other",), "finding"),
    (r"(?:parenchymal )?scar\w*", ("Lung Opacity",), "finding"),
    # Edema
    (r"(?:pulmonary |interstitial |alveolar )?(?:o?edema|edma)\b", ("Edema",), "finding"),
    # Heart failure and volume overload name a syndrome, not the lung edema itself (Open-I's
    # indexers code Heart Failure there, never Pulmonary Edema): an abnormality, not Edema.
    (r"(?:congestive )?heart failure|chf\b|volume overload", (OTHER,), "finding"),
    (
        r"(?:pulmonary )?(?:vascular|venous) (?:congestion|prominence|engorgement)",
        ("Edema",),
        "hedge",
    ),
    (r"pulmonary (?:venous )?congestion", ("Edema",), "hedge"),
    (r"indistinct\w*", ("Edema",), "hedge"),
    # Consolidation, pneumonia, atelectasis
    (r"consolidat\w*|consoldat\w*|consolodat\w*", ("Consolidation",), "finding"),
    (r"(?:broncho)?pneumonia\w*", ("Pneumonia",), "finding"),
    (r"pneumonitis|pnemonia|pnuemonia|pneumona\b", ("Pneumonia",), "finding"),
    # An infection of the lung is a pneumonia; an old granulomatous one is not (see SKIPS).
    (r"infectio\w*", ("Pneumonia",), "finding"),
    (r"atelect\w*|atelecs\w*|atlectas\w*", ("Atelectasis",), "finding"),
    (r"collaps\w*", ("Atelectasis",), "finding"),
    # Pleural
    (
        r"(?:hydro|hemo|haemo)?(?:pneumothora(?:x|ces)|pnuemothora\w*|pneumothroa\w*|pnemothora\w*"
        r"|pneumthora\w*)|pleural air(?: collection)?",
        ("Pneumothorax",),
        "finding",
    ),
    (r"pleural fluid|layering (?:pleural )?fluid", ("Pleural Effusion",), "finding"),
    (
        r"(?:effusions?|effusoins?|effusons?|efusions?|effussions?|effsuions?)\b"
        r"|pleural (?:fusions?|effuisons?)",
        ("Pleural Effusion",),
        "finding",
    ),
    (r"fractur\w*", ("Fracture",), "finding"),
    # Support devices
    (r"(?:pacer|pacemaker|defibrillator|icd|aicd)s?\b", ("Support Devices",), "finding"),
    (r"picc\w*|mediport|port-?a-?cath|(?:chest )?port\b", ("Support Devices",), "finding"),
    (
        r"(?:catheter|cannula|tube|valve|drain|stent|coil|clip|wire|lead)s?\b",
        ("Support Devices",),
        "finding",
    ),
    (r"lines?\b", ("Support Devices",), "finding"),
    (r"(?:support )?(?:devices?|apparatus|equipment|hardware)\b", ("Support Devices",), "finding"),
    (
        r"(?:arthroplast|sternotom)\w*|(?:surgical )?(?:plates?|screws?|markers?)\b",
        ("Support Devices",),
        "finding",
    ),
    # Other abnormal findings: not a column, but the report is not "No Finding".
    (
        r"emphysem\w*|blunt\w*|densit(?:y|ies)|elevat\w*|eventration|(?:levo|dextro|kypho)?scolio\w*"
        r"|degenera\w*|calcifi\w*|hyperinflat\w*|hyperexpan\w*|bronchospasm|asthma"
        r"|hernia\w*|copd|plaques?|osteophyt\w*|aortic disease|bronchiolitis"
        r"|airways? disease|thickening|cephali[sz]ation|aspiration|bullae?|bullous|contusion"
        r"|atherosclero\w*|osteopeni\w*|metasta\w*|granulom\w*|pneumomediastinum"
        r"|pneumoperitoneum|osteodystroph\w*|cuffing|irregular lucency|inflam\w*|fissur\w*"
        r"|hypertension|prominen\w*|kyphos\w*|bullets?|reticula\w*|thoracentesis|bronchitis"
        r"|volume loss|deformit\w*|hemorrhag\w*|hematoma|radiopaque|aerophagia|arthropath\w*"
        r"|tracheostomy|adenopathy|lymphadenopathy|tortuo\w*|ectatic|ectasia|dilat\w*"
        r"|bronchiectasis|pneumatocele|cavitation",
        (OTHER,),
        "finding",
    ),
)

# Text that looks like a mention but is not one; matched before the mentions at the same place.
SKIPS = (
    r"pericardial effusions?",
    r"calcified (?:granulom\w*|lymph nodes?)",
    r"(?:chest wall|soft tissue|breast|axillary|mediastinal|hilar|neck|thyroid|abdominal) mass(?:es)?",
    r"(?:vertebral|compression|vertebral body) collapse",
    r"massive\w*|massengale",
    r"pleural lines?|septal lines?|kerley(?: b)? lines?|skin ?folds? lines?|line of",
    # A structure named only as a place ("overlying the heart") says nothing about its size.
    r"(?:over(?:lying|lies|lie)?|overly|in|behind|projects? over|projecting over) the "
    r"(?:superior |left |right )?(?:heart|cardiac silhouette|cardiac shadow|mediastinum"
    r"|cardiomediastin\w*(?: silhouette)?|mediastinal (?:contours?|silhouette))",
    r"heart rate",
    r"(?:size|caliber) and contours?|(?:ventricular|diaphragm\w*|rib|osseous|bony|skin) contours?"
    r"|contours? (?:irregularit\w*|deformit\w*|abnormalit\w*)",
    r"tubercul\w*(?: infection)?",
    r"granulomatous (?:infection|disease|process)",
    r"(?:old|prior|previous|remote|healed|past|chronic) (?:granulomatous )?infection\w*",
    r"(?:soft tissue|subcutaneous|extremity|leg|ankle|pedal|scrotal|facial) edema",
    r"sided heart",
)

# Cues: (fragment, kind, direction, window, restrict).
# kind: "neg" negation; "unc" uncertainty; "unc_first" uncertainty that outranks negation
#   ("cannot be excluded" contains a negation but leaves the finding possible); "pseudo"
#   consumes text that would otherwise read as a cue ("no change in"); "resolved" a negation
#   that says the finding went away, which outranks "resolving" (a positive: still there) of
#   the same finding elsewhere in the report; "stable" makes a bare anatomy mention uncertain
#   ("stable cardiac silhouette") but not an enlarged one.
# direction: "pre" applies to mentions after the cue, "post" to mentions before it, "both" to
#   either.
# window: most words allowed between cue and mention (None: the whole clause).
# restrict: "anatomy" limits the cue to anatomy mentions ("stable heart size").
# A clause ends at a sentence end or at a contrastive word ("but", "however").
# Listed most specific first: at one position the first cue that matches is taken.
CUES: tuple[tuple[str, str, str, int | None, str | None], ...] = (
    # uncertainty that outranks negation
    (
        r"(?:cannot|can not|could not|may not|not) (?:be )?(?:entirely |completely |totally "
        r"|confidently |definitely |reliably )?"
        r"(?:excluded|ruled out)",
        "unc_first",
        "post",
        8,
        None,
    ),
    (
        r"(?:cannot|can not|could not|unable to) (?:entirely |completely )?"
        r"(?:exclude|rule out)",
        "unc_first",
        "pre",
        None,
        None,
    ),
    (r"no evidence to rule out", "unc_first", "pre", None, None),
    (r"no new", "unc_first", "pre", None, None),
    # pseudo-cues: consume the words so they do not negate
    (
        r"no (?:significant |appreciable |substantial |definite |interval )*change"
        r"|without (?:significant |appreciable |interval )*change"
        r"|not (?:only|necessarily)|gram negative|no increase|no decrease|to (?:suggest|indicate)"
        # a hedge on change or degree, not on the finding ("questionable increased opacity")
        r"|(?:questionabl[ey]|possibl[ey]|slightly|subtle|minimally) (?:increas\w*|decreas\w*"
        r"|more|less|worse\w*|improv\w*|larger|smaller|progress\w*)"
        r"|(?:near|nearly|almost|partial|incomplete)[- ](?:complete |total )?resolution of",
        "pseudo",
        "pre",
        0,
        None,
    ),
    # negation after the mention
    (
        r"(?:(?:is|are|was|were|has been|have been) )?(?:no longer|not) (?:definitely |clearly "
        r"|well[- ]|convincingly "
        r"|significantly |substantially |markedly |appreciably |grossly )?"
        r"(?:seen|identified|visuali[sz]ed|demonstrated|present|evident|noted|detected|visible"
        r"|apparent|enlarged|shown|recognized|observed)",
        "neg",
        "post",
        8,
        None,
    ),
    (
        r"(?:(?:is|are|was|were|has|have) )?(?:been )?(?:almost|nearly|partially|incompletely"
        r"|partly|not (?:completely|entirely|fully))(?: completely)? (?:resolved|cleared)",
        "pseudo",
        "pre",
        0,
        None,
    ),
    (
        r"(?:(?:is|are|was|were|has|have) )?(?:(?:now|since|completely) )?"
        r"(?:been )?(?:resolved|cleared|removed|withdrawn)",
        "resolved",
        "both",
        6,
        None,
    ),
    # Still present, on its way out: positive, but an explicit "resolved" elsewhere wins.
    (
        r"(?:(?:is|are|was|were) )?(?:resolving|improving|clearing)",
        "resolving",
        "both",
        3,
        None,
    ),
    (
        r"(?:is|are|was|were|remains?|appears?|looks?|seems?)(?: to be)?"
        r"(?: now| otherwise| again| also| still| stably| grossly| essentially| overall)?"
        r"(?: within| at)?(?: the)? (?:normal|unremarkable|top normal|top-normal"
        r"|upper (?:limits? )?(?:of )?normal|low normal|not enlarged|normal limits)",
        "neg",
        "both",
        8,
        "anatomy",
    ),
    (r"(?:is|are|was|were|remains?) (?:now )?(?:absent|negative)", "neg", "post", 8, None),
    (
        r"(?:of |in )?(?:top |upper |low )?normal (?:size|caliber|calibre|contour|configuration)"
        r"(?: and (?:size|contour|configuration))?(?: of)?(?: the)?",
        "neg",
        "both",
        3,
        "anatomy",
    ),
    (
        r"(?:(?:within|at|near) (?:the )?)?(?:upper|high|top)[- ](?:limits? )?(?:of )?normal"
        r"(?: (?:in |for )?(?:size|limits))?",
        "neg",
        "both",
        6,
        "anatomy",
    ),
    (
        r"(?:within|at) (?:the )?(?:upper )?(?:limits? of )?normal(?: limits)?",
        "neg",
        "post",
        6,
        "anatomy",
    ),
    (
        r"(?:top |upper |low )?(?:normal|unremarkable)(?: appearance of(?: the)?)?",
        "neg",
        "both",
        2,
        "anatomy",
    ),
    # uncertainty after the mention
    (r"(?:would|could|might|may) (?:also )?be a consideration", "unc", "post", 12, None),
    (
        r"(?:(?:may|might|could|can|would)(?: also| possibly| potentially)?"
        r"|(?:is|are) possibly)(?: be| have| also be)?"
        r" (?:present|seen|noted|considered|possible|a consideration|contributing|contributory"
        r"|superimposed|developing|this appearance|appear)\b",
        "unc",
        "post",
        6,
        None,
    ),
    # "which may be related to edema": the finding before and the one after are both possible.
    (
        r"(?:may|might|could|can|would)(?: also| possibly| potentially)?(?: be)? related(?: to)?",
        "unc",
        "both",
        6,
        None,
    ),
    (r"(?:is|are) in the differential(?: diagnosis)?", "unc", "post", 6, None),
    (r"(?:is|are) (?:a|another) (?:possibility|consideration)", "unc", "post", 6, None),
    (r"(?:in |for )?detect(?:ing|ion of)?", "unc", "pre", 4, None),
    (r"(?:further )?(?:evaluation|assessment) of(?: (?:this|the|these))?", "unc", "pre", 2, None),
    (
        r"(?:is|are|was|were|appears?) (?:now )?less (?:apparent|perceptible|conspicuous|visible"
        r"|evident)",
        "unc",
        "post",
        6,
        None,
    ),
    (r"suspected", "unc", "both", 6, None),
    (
        r"(?:(?:is|are|was|were) )?(?:also )?(?:difficult|hard) to (?:entirely |completely )?"
        r"(?:exclude|rule out)",
        "unc_first",
        "both",
        8,
        None,
    ),
    (
        r"(?:is|are|was|were) (?:also )?(?:suspected|questioned|possible|questionable"
        r"|not excluded|in question|a consideration|considered)",
        "unc",
        "post",
        6,
        None,
    ),
    (
        r"(?:is|are|was|were) (?:poorly|incompletely|not well|not clearly|not) "
        r"(?:evaluated|visuali[sz]ed|assessed|seen|appreciated)|not (?:well[- ]|clearly )?"
        r"(?:evaluated|assessed|appreciated)|poorly (?:evaluated|visuali[sz]ed|seen)",
        "unc",
        "post",
        6,
        None,
    ),
    (r"(?:is|are) obscured|obscured|obscuration", "unc", "post", 3, None),
    (
        r"(?:is |are |appears? |remains? )?(?:stable|unchanged|similar to (?:the )?prior\w*"
        r"|not changed|without change)",
        "stable",
        "both",
        3,
        "anatomy",
    ),
    (r"\?", "unc", "post", 3, None),
    (r"(?:less|not) likely", "unc", "post", 2, None),
    # negation before the mention
    (
        r"no (?:evidence|signs?|findings?|features?|areas?|focus|foci|suggestion|definite"
        r"|definitive|obvious|convincing)(?: of| for| to suggest)?",
        "neg",
        "pre",
        None,
        None,
    ),
    (r"(?:without|w/o)(?: (?:evidence|signs?|findings?) (?:of|for))?", "neg", "pre", None, None),
    (r"(?:negative|free|clear|clearing) (?:for|of)", "neg", "pre", None, None),
    (
        r"(?:absence|removal|disappearance) of",
        "neg",
        "pre",
        None,
        None,
    ),
    (r"(?:rule out|r/o|to exclude|exclude|excluding|ruled out)", "neg", "pre", None, None),
    (r"(?:interval |complete )?resolution of", "resolved", "pre", None, None),
    (r"no|none|neither|nor", "neg", "pre", None, None),
    (r"(?:absent|negative|clear)\b", "neg", "post", 0, None),
    (r"not|absent", "neg", "pre", 3, None),
    # uncertainty before the mention
    (
        r"(?:may|might|could|would|can)(?: also| possibly| potentially)? (?:represent|reflect|"
        r"indicate|include|be|suggest|relate|have|signify|correspond)",
        "unc",
        "pre",
        None,
        None,
    ),
    (
        r"(?:possibl|questionabl)[ey]|maybe|perhaps|equivocal"
        r"|indeterminate|borderline|uncertain|suspect|suspicio(?:us|n) (?:for|of)|suggesting"
        r"|question(?:ed)?"
        r"|concern(?:ing)? (?:for|of)|worrisome (?:for|of)|(?:question|suggestion|possibility)"
        r" of|suggestive of|suggests?|differential(?: diagnosis)?(?: includes?| considerations?)?"
        r"|secondary to"
        r"|(?:correlate|correlation)(?: clinically)? (?:for|with|to)|could|may|might"
        r"|(?:evaluation|evaluate|assessment|assess) for",
        "unc",
        "pre",
        None,
        None,
    ),
    (r"(?:obscur\w*)(?: the)?", "unc", "pre", 2, None),
)

# Words that end a cue's scope inside a sentence.
TERMINATORS = (
    r"but|however|although|though|except(?: for)?|aside from|apart from|other than"
    r"|whereas|nevertheless|nonetheless|yet|there (?:is|are|has been|have been)"
)

# An anatomy mention ("the heart", "cardiac silhouette") that no cue acts on is positive only
# when its clause says the structure is enlarged; otherwise it states nothing.
# ... unless the clause hedges the size ("the heart is borderline enlarged"): uncertain.
BORDERLINE = r"borderline|upper limits? of normal|top normal|top-normal"
ENLARGED = (
    r"enlarg\w*|(?:is|are|appears?|remains?|size|xxxx) (?:\w+ )?(?:large|increased)\b"
    r"|increase\w* in (?:\w+ )?(?:heart|cardiac) size|cardiomegal\w*|widen\w*"
)

# Diagnoses: offered as one of alternatives ("atelectasis versus pneumonia", "edema or
# fibrosis") they are uncertain, while a descriptive finding so offered ("atelectasis or
# scarring", "effusion versus thickening") stays asserted.
DIAGNOSES = frozenset({"Pneumonia", "Edema"})
ALTERNATIVE = r"or|versus|vs\.?"
# ... but "residual or recurrent pneumonia" offers two states of one pneumonia.
STATES = (
    r"residual|recurrent|persistent|developing|early|acute|chronic|mild|new|worsening"
    r"|increasing|resolving|improving|atypical|superimposed|underlying|active"
)

# Report sections that give the reason for the study: their text is skipped, up to the next
# section that reports findings, else to the end of its sentence. (COMPARISON is not among
# them: dictations often go on with today's findings after "Comparison:".)
CONTEXT_SECTIONS = (
    r"indications?|(?:clinical )?history|clinical (?:information|indication|data|details)"
    r"|reason for (?:exam\w*|study|referral)"
)
REPORT_SECTIONS = r"findings?|impressions?|conclusions?|opinion|interpretation|report"
